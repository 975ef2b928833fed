"""Track API requests → Pipelines calls, as docs/track-api-coming-in.md's
table writes them down.

Pure functions: one Track request (already authenticated and decoded) in,
the list of Pipelines call dicts it becomes out, or a ``TrackError`` naming
the field.  Each returned call is a fresh dict (nothing shared between calls)
that still lacks what every call gets on the way to the spool (messageId
unless Track gave an event ``id``, receivedAt, timestamp when Track gave
none, context.ip): ``Ingest.prepare_calls`` adds that.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable, NoReturn

import msgspec

from gateway.track_api.validation import (
    MAX_ID_BYTES, TrackError, attributes, event_data, event_name, identifier, obj, object_type_id, only_keys,
    unix_time,
)
from gateway.units import shown

Call = dict[str, Any]

#: the keys that name a person; they go to context.journeys.identifiers, not to traits
PERSON_KEYS = ("id", "email", "cio_id")
DEFAULT_OBJECT_TYPE_ID = "1"  # what Pipelines assumes when a group call names no type
# The shape Customer.io reads a path identifier by (and the customerio_track
# destination maps userId back by): cio_<id>, an e-mail address, else an id.
_EMAIL = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?",
    re.I | re.ASCII)
EVENT_TYPES = ("event", "page", "screen")
PLATFORMS = ("ios", "android")


class Person(msgspec.Struct):
    """A person as Track named them: the Pipelines ``userId`` and the
    identifiers that go to ``context.journeys.identifiers``."""

    user_id: str
    identifiers: dict[str, str]


class ObjectRef(msgspec.Struct):
    object_type_id: str
    object_id: str

    def identifiers(self) -> dict[str, str]:
        return {"object_type_id": self.object_type_id, "object_id": self.object_id}


# -- identifiers ---------------------------------------------------------------------------------

def path_person(ref: str, where: str = "path.identifier") -> Person:
    """The ``{identifier}`` of a v1 path, read by its shape: ``cio_<x>`` is a
    cio_id, an e-mail address is an email, anything else an id.  userId is
    the reference as written, so ``cio_`` and e-mails survive the trip back."""
    identifier(ref, where)
    if ref.startswith("cio_") and len(ref) > 4:
        return Person(ref, {"cio_id": ref[4:]})
    if _EMAIL.fullmatch(ref):
        return Person(ref, {"email": ref})
    return Person(identifier(ref, where, limit=MAX_ID_BYTES), {"id": ref})


def entity_person(value: Any, where: str) -> Person:
    """v2 ``identifiers`` (and merge's primary/secondary): exactly one of id, email, cio_id."""
    ids = obj(value, where, required=True)
    if len(ids) != 1:
        raise TrackError("bad_field", f"{where} must hold exactly one of id, email or cio_id "
                         f"(you cannot pass several identifiers)", where)
    (key, raw), = ids.items()
    if key not in PERSON_KEYS:
        raise TrackError("bad_field", f"{where}.{key} is not an identifier the gateway accepts "
                         f"(one of id, email, cio_id)", f"{where}.{key}")
    v = identifier(raw, f"{where}.{key}", limit=MAX_ID_BYTES if key == "id" else None)
    return Person(v if key != "cio_id" else f"cio_{v}", {key: v})


def object_ref(value: Any, where: str) -> ObjectRef:
    ids = obj(value, where, required=True)
    if "cio_object_id" in ids:
        raise TrackError("unsupported", f"{where}.cio_object_id is not supported by the gateway: "
                         "name the object by object_type_id and object_id", f"{where}.cio_object_id")
    only_keys(ids, ("object_type_id", "object_id"), where)
    if "object_type_id" not in ids:
        raise TrackError("missing_field", f"{where}.object_type_id is required", f"{where}.object_type_id")
    return ObjectRef(object_type_id(ids["object_type_id"], f"{where}.object_type_id"),
                     identifier(ids.get("object_id"), f"{where}.object_id", limit=MAX_ID_BYTES)
                     if ids.get("object_id") is not None else _missing(f"{where}.object_id"))


def _missing(where: str) -> NoReturn:
    raise TrackError("missing_field", f"{where} is required", where)


def _split_identifiers(attrs: dict[str, Any], person: Person, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Identify's attributes less the identifier keys, which join the person's
    identifiers; a key that names the person differently stays an attribute
    (Track treats it as an attempt to change that identifier)."""
    traits = dict(attrs)
    ids = dict(person.identifiers)
    for key in PERSON_KEYS:
        if key in traits:
            value = identifier(traits[key], f"{where}.{key}", limit=MAX_ID_BYTES if key == "id" else None)
            if key not in ids:
                ids[key] = value
                del traits[key]
            elif ids[key] == value:
                del traits[key]
    return traits, ids


# -- building calls --------------------------------------------------------------------------------

def _context(identifiers: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"journeys": {"identifiers": dict(identifiers)}, **extra}


def _track(person: Person | None, event: str, properties: dict[str, Any], identifiers: dict[str, str], *,
           timestamp: str | None = None, context: dict[str, Any] | None = None) -> Call:
    """A track call, as the semantic events are written."""
    call: Call = {"type": "track"}
    if person is not None:
        call["userId"] = person.user_id
    call["event"] = event
    call["properties"] = properties
    if timestamp is not None:
        call["timestamp"] = timestamp
    call["context"] = context if context is not None else _context(identifiers)
    return call


def _group(person: Person | None, obj_ref: ObjectRef, traits: dict[str, Any], relationship: dict[str, Any],
           identifiers: dict[str, str], *, anonymous_id: str | None = None, timestamp: str | None = None) -> Call:
    """A group call: the object is ``groupId``; its type is a trait unless it
    is the default 1; the relationship's attributes are ``relationshipAttributes``."""
    call: Call = {"type": "group"}
    if person is not None:
        call["userId"] = person.user_id
    if anonymous_id is not None:
        call["anonymousId"] = anonymous_id
    call["groupId"] = obj_ref.object_id
    group_traits = dict(traits)
    if obj_ref.object_type_id != DEFAULT_OBJECT_TYPE_ID:
        group_traits["object_type_id"] = obj_ref.object_type_id
    if relationship:
        group_traits["relationshipAttributes"] = dict(relationship)
    call["traits"] = group_traits
    if timestamp is not None:
        call["timestamp"] = timestamp
    call["context"] = _context(identifiers)
    return call


def _relationship_deleted(person: Person | None, obj_ref: ObjectRef, identifiers: dict[str, str],
                          anonymous_id: str | None = None) -> Call:
    call = _track(person, "Relationship Deleted",
                  {"objectId": obj_ref.object_id, "objectTypeId": int(obj_ref.object_type_id)}, identifiers)
    if anonymous_id is not None:
        call["anonymousId"] = anonymous_id
    return call


def _relationships_of_person(value: Any, where: str) -> list[tuple[ObjectRef, dict[str, Any]]]:
    """A person's relationships: ``[{identifiers: {object_type_id, object_id}, relationship_attributes}]``."""
    if not isinstance(value, list):
        raise TrackError("bad_field", f"{where} must be an array", where)
    out = []
    for i, rel in enumerate(value):
        here = f"{where}[{i}]"
        rel = obj(rel, here, required=True)
        only_keys(rel, ("identifiers", "relationship_attributes"), here)
        out.append((object_ref(rel.get("identifiers"), f"{here}.identifiers"),
                    attributes(rel.get("relationship_attributes"), f"{here}.relationship_attributes")))
    return out


def _relationships_of_object(value: Any, where: str, *, anonymous: bool = False
                             ) -> list[tuple[Person | None, str | None, dict[str, Any]]]:
    """An object's relationships: the people (or, for identify_anonymous, the
    anonymous_ids) with their relationship attributes."""
    if not isinstance(value, list):
        raise TrackError("bad_field", f"{where} must be an array", where)
    out: list[tuple[Person | None, str | None, dict[str, Any]]] = []
    for i, rel in enumerate(value):
        here = f"{where}[{i}]"
        rel = obj(rel, here, required=True)
        only_keys(rel, ("identifiers", "relationship_attributes"), here)
        attrs = attributes(rel.get("relationship_attributes"), f"{here}.relationship_attributes")
        if anonymous:
            ids = obj(rel.get("identifiers"), f"{here}.identifiers", required=True)
            only_keys(ids, ("anonymous_id",), f"{here}.identifiers")
            anon = ids.get("anonymous_id")
            out.append((None, identifier(anon, f"{here}.identifiers.anonymous_id") if anon is not None
                        else _missing(f"{here}.identifiers.anonymous_id"), attrs))
        else:
            out.append((entity_person(rel.get("identifiers"), f"{here}.identifiers"), None, attrs))
    return out


def _timestamp(body: dict[str, Any], key: str = "timestamp") -> str | None:
    v = body.get(key)
    return None if v is None else unix_time(v, key)


def _event(person: Person | None, body: dict[str, Any], *, type_: str, data_key: str,
           identifiers: dict[str, str], anonymous_id: str | None = None) -> Call:
    """A v1 event or a v2 person event/page/screen: ``track`` with ``event``,
    or ``page``/``screen`` with ``name``; the data are the properties; Track's
    dedupe ``id`` is the messageId."""
    name = event_name(body.get("name"), limited=type_ == "event")
    call: Call = {"type": "track" if type_ == "event" else type_}
    if person is not None:
        call["userId"] = person.user_id
    if anonymous_id is not None:
        call["anonymousId"] = anonymous_id
    call["event" if type_ == "event" else "name"] = name
    call["properties"] = event_data(body.get(data_key), data_key)
    if body.get("id") is not None:
        call["messageId"] = identifier(body["id"], "id")
    if (ts := _timestamp(body)) is not None:
        call["timestamp"] = ts
    call["context"] = _context(identifiers)
    return call


def _event_type(body: dict[str, Any]) -> str:
    t = body.get("type", "event")
    if t is None:
        return "event"
    if t not in EVENT_TYPES:
        raise TrackError("bad_field", f"type must be one of {', '.join(EVENT_TYPES)}; got {shown(t)}",
                         "type")
    return str(t)


def _device(value: Any, where: str, token_key: str) -> tuple[str, str, str | None, dict[str, Any]]:
    """(token, platform, last_used as ISO or None, attributes) of an added device."""
    device = obj(value, where, required=True)
    only_keys(device, (token_key, "platform", "last_used", "attributes"), where)
    token = identifier(device.get(token_key), f"{where}.{token_key}") if device.get(token_key) is not None \
        else _missing(f"{where}.{token_key}")
    platform = device.get("platform")
    if platform is None:
        _missing(f"{where}.platform")
    if platform not in PLATFORMS:
        raise TrackError("bad_field", f"{where}.platform must be ios or android; "
                         f"got {shown(platform)}",
                         f"{where}.platform")
    last_used = device.get("last_used")
    attrs = obj(device.get("attributes"), f"{where}.attributes")
    for k, v in attrs.items():
        if not isinstance(v, str):
            raise TrackError("bad_field", f"{where}.attributes.{k} must be a string (device attributes are strings)",
                             f"{where}.attributes.{k}")
    return token, str(platform), None if last_used is None else unix_time(last_used, f"{where}.last_used"), attrs


def _device_created(person: Person, token: str, platform: str, last_used: str | None,
                    attrs: dict[str, Any]) -> Call:
    return _track(person, "Device Created or Updated", dict(attrs), person.identifiers, timestamp=last_used,
                  context=_context(person.identifiers, device={"token": token, "type": platform}))


def _device_deleted(person: Person, token: str) -> Call:
    return _track(person, "Device Deleted", {}, person.identifiers,
                  context=_context(person.identifiers, device={"token": token}))


# -- Track v1 ------------------------------------------------------------------------------------------

V1_IDENTIFY_DIRECTIVES = ("cio_relationships", "_timestamp")


def v1_identify(ref: str, body: dict[str, Any]) -> list[Call]:
    """``PUT /api/v1/customers/{identifier}``: an identify call; with
    ``cio_relationships``, a group call per related object too (or a
    Relationship Deleted per object for ``delete_relationships``)."""
    person = path_person(ref)
    attrs = attributes({k: v for k, v in body.items() if k not in V1_IDENTIFY_DIRECTIVES}, "attributes")
    traits, ids = _split_identifiers(attrs, person, "attributes")
    ts = _timestamp(body, "_timestamp")
    identify: Call = {"type": "identify", "userId": person.user_id, "traits": traits}
    if ts is not None:
        identify["timestamp"] = ts
    identify["context"] = _context(ids)
    calls = [identify]
    rels = body.get("cio_relationships")
    if rels is not None:
        rels = obj(rels, "cio_relationships")
        only_keys(rels, ("action", "relationships"), "cio_relationships")
        action = rels.get("action", "add_relationships")
        if action not in ("add_relationships", "delete_relationships"):
            raise TrackError("bad_field", "cio_relationships.action must be add_relationships or "
                             f"delete_relationships; got {shown(action)}", "cio_relationships.action")
        for obj_ref, rel_attrs in _relationships_of_person(rels.get("relationships", []),
                                                           "cio_relationships.relationships"):
            if action == "add_relationships":
                calls.append(_group(person, obj_ref, {}, rel_attrs, person.identifiers, timestamp=ts))
            else:
                calls.append(_relationship_deleted(person, obj_ref, person.identifiers))
    return calls


def v1_delete(ref: str) -> list[Call]:
    """``DELETE /api/v1/customers/{identifier}``: the semantic event User Deleted."""
    person = path_person(ref)
    return [_track(person, "User Deleted", {}, person.identifiers)]


def v1_event(ref: str, body: dict[str, Any]) -> list[Call]:
    """``POST /api/v1/customers/{identifier}/events``: track, or page/screen by ``type``."""
    only_keys(body, ("name", "data", "type", "timestamp", "id", "anonymous_id"))
    person = path_person(ref)
    anon = body.get("anonymous_id")
    return [_event(person, body, type_=_event_type(body), data_key="data", identifiers=person.identifiers,
                   anonymous_id=None if anon is None else identifier(anon, "anonymous_id"))]


def new_anonymous_id() -> str:
    return str(uuid.uuid4())


def v1_anonymous_event(body: dict[str, Any], make_anonymous_id: Callable[[], str] = new_anonymous_id
                       ) -> list[Call]:
    """``POST /api/v1/events``: an event of nobody known.  Without an
    ``anonymous_id`` the call gets a fresh one, since a Pipelines track call
    needs userId or anonymousId."""
    only_keys(body, ("name", "data", "type", "timestamp", "id", "anonymous_id"))
    anon = body.get("anonymous_id")
    ids = {} if anon is None else {"anonymous_id": identifier(anon, "anonymous_id")}
    return [_event(None, body, type_=_event_type(body), data_key="data", identifiers=ids,
                   anonymous_id=make_anonymous_id() if anon is None else ids["anonymous_id"])]


def v1_add_device(ref: str, body: dict[str, Any]) -> list[Call]:
    """``PUT /api/v1/customers/{identifier}/devices``: Device Created or Updated,
    the token (v1 calls it ``device.id``) and platform in ``context.device``."""
    only_keys(body, ("device",))
    person = path_person(ref)
    return [_device_created(person, *_device(body.get("device"), "device", "id"))]


def v1_delete_device(ref: str, token: str) -> list[Call]:
    """``DELETE /api/v1/customers/{identifier}/devices/{token}``: Device Deleted."""
    person = path_person(ref)
    return [_device_deleted(person, identifier(token, "path.token"))]


def v1_suppress(ref: str) -> list[Call]:
    person = path_person(ref)
    return [_track(person, "User Suppressed", {}, person.identifiers)]


def v1_unsuppress(ref: str) -> list[Call]:
    person = path_person(ref)
    return [_track(person, "User Unsuppressed", {}, person.identifiers)]


def _merge(body: dict[str, Any]) -> list[Call]:
    primary = entity_person(body.get("primary"), "primary")
    secondary = entity_person(body.get("secondary"), "secondary")
    return [{"type": "alias", "userId": primary.user_id, "previousId": secondary.user_id,
             "context": _context(primary.identifiers)}]


def v1_merge(body: dict[str, Any]) -> list[Call]:
    """``POST /api/v1/merge_customers``: alias; the secondary person is ``previousId``."""
    only_keys(body, ("primary", "secondary"))
    return _merge(body)


# -- Track v2 ----------------------------------------------------------------------------------------

def _person_identify(op: dict[str, Any]) -> list[Call]:
    person = entity_person(op.get("identifiers"), "identifiers")
    traits, ids = _split_identifiers(attributes(op.get("attributes"), "attributes"), person, "attributes")
    ts = _timestamp(op)
    identify: Call = {"type": "identify", "userId": person.user_id, "traits": traits}
    if ts is not None:
        identify["timestamp"] = ts
    identify["context"] = _context(ids)
    calls = [identify]
    if op.get("cio_relationships") is not None:
        for obj_ref, rel_attrs in _relationships_of_person(op["cio_relationships"], "cio_relationships"):
            calls.append(_group(person, obj_ref, {}, rel_attrs, person.identifiers, timestamp=ts))
    return calls


def _person_semantic(event: str) -> Callable[[dict[str, Any]], list[Call]]:
    def build(op: dict[str, Any]) -> list[Call]:
        person = entity_person(op.get("identifiers"), "identifiers")
        return [_track(person, event, {}, person.identifiers)]
    return build


def _person_event(type_: str) -> Callable[[dict[str, Any]], list[Call]]:
    def build(op: dict[str, Any]) -> list[Call]:
        person = entity_person(op.get("identifiers"), "identifiers")
        return [_event(person, op, type_=type_, data_key="attributes", identifiers=person.identifiers)]
    return build


def _person_relationships(op: dict[str, Any], *, add: bool) -> list[Call]:
    person = entity_person(op.get("identifiers"), "identifiers")
    if op.get("cio_relationships") is None:
        _missing("cio_relationships")
    rels = _relationships_of_person(op["cio_relationships"], "cio_relationships")
    if add:
        return [_group(person, o, {}, a, person.identifiers) for o, a in rels]
    return [_relationship_deleted(person, o, person.identifiers) for o, _ in rels]


def _person_add_device(op: dict[str, Any]) -> list[Call]:
    person = entity_person(op.get("identifiers"), "identifiers")
    return [_device_created(person, *_device(op.get("device"), "device", "token"))]


def _person_delete_device(op: dict[str, Any]) -> list[Call]:
    person = entity_person(op.get("identifiers"), "identifiers")
    device = obj(op.get("device"), "device", required=True)
    only_keys(device, ("token",), "device")
    token = device.get("token")
    return [_device_deleted(person, identifier(token, "device.token") if token is not None
                            else _missing("device.token"))]


def _object_identify(op: dict[str, Any], *, anonymous: bool = False) -> list[Call]:
    """Object identify: one group call per related person (each carrying the
    object's attributes as traits), or one without a person when none is named."""
    obj_ref = object_ref(op.get("identifiers"), "identifiers")
    traits = attributes(op.get("attributes"), "attributes")
    rels = [] if op.get("cio_relationships") is None else \
        _relationships_of_object(op["cio_relationships"], "cio_relationships", anonymous=anonymous)
    if not rels:
        return [_group(None, obj_ref, traits, {}, obj_ref.identifiers())]
    calls = []
    for person, anon, rel_attrs in rels:
        who = person.identifiers if person is not None else {"anonymous_id": anon or ""}
        calls.append(_group(person, obj_ref, traits, rel_attrs, {**obj_ref.identifiers(), **who}, anonymous_id=anon))
    return calls


def _object_relationships(op: dict[str, Any], *, add: bool) -> list[Call]:
    obj_ref = object_ref(op.get("identifiers"), "identifiers")
    if op.get("cio_relationships") is None:
        _missing("cio_relationships")
    calls = []
    for person, _, rel_attrs in _relationships_of_object(op["cio_relationships"], "cio_relationships"):
        assert person is not None
        ids = {**obj_ref.identifiers(), **person.identifiers}
        calls.append(_group(person, obj_ref, {}, rel_attrs, ids) if add else
                     _relationship_deleted(person, obj_ref, ids))
    return calls


def _object_delete(op: dict[str, Any]) -> list[Call]:
    """Object Deleted.  Pipelines wants an anonymousId on it and Track names no
    person, so the object stands in: ``object:<type id>:<object id>``."""
    obj_ref = object_ref(op.get("identifiers"), "identifiers")
    call = _track(None, "Object Deleted", {"objectId": obj_ref.object_id,
                                           "objectTypeId": int(obj_ref.object_type_id)}, obj_ref.identifiers())
    call["anonymousId"] = f"object:{obj_ref.object_type_id}:{obj_ref.object_id}"
    return [call]


DELIVERY_METRICS = ("opened", "converted", "delivered")


def _delivery_event(op: dict[str, Any]) -> list[Call]:
    """Report Delivery Event; the delivery stands in as the anonymousId (``delivery:<id>``)."""
    ids = obj(op.get("identifiers"), "identifiers", required=True)
    only_keys(ids, ("id",), "identifiers")
    delivery_id = identifier(ids.get("id"), "identifiers.id") if ids.get("id") is not None \
        else _missing("identifiers.id")
    metric = op.get("name")
    if metric is None:
        _missing("name")
    if metric not in DELIVERY_METRICS:
        raise TrackError("bad_field", f"name must be one of {', '.join(DELIVERY_METRICS)}; "
                         f"got {shown(metric)}", "name")
    attrs = dict(obj(op.get("attributes"), "attributes", required=True))
    properties: dict[str, Any] = {"deliveryId": delivery_id, "metric": metric}
    token = attrs.pop("device_token", None)
    if token is not None:
        properties["recipient"] = identifier(token, "attributes.device_token")
    properties.update(attrs)
    call = _track(None, "Report Delivery Event", properties, {"id": delivery_id})
    call["anonymousId"] = f"delivery:{delivery_id}"
    return [call]


class Action(msgspec.Struct, frozen=True):
    """One v2 (type, action): the keys it may carry and how it maps."""

    keys: tuple[str, ...]
    build: Callable[[dict[str, Any]], list[Call]]


_EVENT_KEYS = ("identifiers", "name", "id", "timestamp", "attributes")
V2_ACTIONS: dict[str, dict[str, Action]] = {
    "person": {
        "identify": Action(("identifiers", "timestamp", "attributes", "cio_relationships"), _person_identify),
        "delete": Action(("identifiers",), _person_semantic("User Deleted")),
        "event": Action(_EVENT_KEYS, _person_event("event")),
        "screen": Action(_EVENT_KEYS, _person_event("screen")),
        "page": Action(_EVENT_KEYS, _person_event("page")),
        "add_relationships": Action(("identifiers", "cio_relationships"),
                                    lambda op: _person_relationships(op, add=True)),
        "delete_relationships": Action(("identifiers", "cio_relationships"),
                                       lambda op: _person_relationships(op, add=False)),
        "add_device": Action(("identifiers", "device"), _person_add_device),
        "delete_device": Action(("identifiers", "device"), _person_delete_device),
        "merge": Action(("primary", "secondary"), _merge),
        "suppress": Action(("identifiers",), _person_semantic("User Suppressed")),
        "unsuppress": Action(("identifiers",), _person_semantic("User Unsuppressed")),
    },
    "object": {
        "identify": Action(("identifiers", "attributes", "cio_relationships"), _object_identify),
        "identify_anonymous": Action(("identifiers", "attributes", "cio_relationships"),
                                     lambda op: _object_identify(op, anonymous=True)),
        "delete": Action(("identifiers",), _object_delete),
        "add_relationships": Action(("identifiers", "cio_relationships"),
                                    lambda op: _object_relationships(op, add=True)),
        "delete_relationships": Action(("identifiers", "cio_relationships"),
                                       lambda op: _object_relationships(op, add=False)),
    },
    "delivery": {
        "event": Action(("identifiers", "name", "attributes"), _delivery_event),
    },
}


def v2_operation(op: Any) -> list[Call]:
    """One ``/api/v2/entity`` body or one element of ``/api/v2/batch``, by its type and action."""
    if not isinstance(op, dict):
        raise TrackError("json", "an operation must be a JSON object", "")
    type_ = op.get("type")
    if type_ is None:
        _missing("type")
    actions = V2_ACTIONS.get(type_) if isinstance(type_, str) else None
    if actions is None:
        raise TrackError("bad_field", f"type must be one of {', '.join(V2_ACTIONS)}; got {shown(type_)}",
                         "type")
    action_name = op.get("action")
    if action_name is None:
        _missing("action")
    action = actions.get(action_name) if isinstance(action_name, str) else None
    if action is None:
        raise TrackError("bad_field", f"action {shown(action_name)} is not an action of type {type_} "
                         f"(one of {', '.join(actions)})", "action")
    only_keys(op, ("type", "action", *action.keys))
    return action.build(op)
