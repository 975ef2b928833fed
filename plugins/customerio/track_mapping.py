"""One Pipelines call → one Track v2 op, as a plain dict: the rules R1-R18 of
docs/customerio-track-v2.md §3 and §4 (rule ids such as R8, ID-5 and D-14 in
this file are that document's).  Nothing here sends anything; the
destination (``track_v2``) checks the op's limits, encodes it and sends it.

``op_of`` runs once per event and per retry, so it builds plain dicts and
never changes the call it is given.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Callable, Literal

import msgspec

from gateway.api import MappingError
from plugins.customerio import track_fields as fields
from plugins.customerio.client import check_region
from plugins.customerio.timestamps import convert_timestamps, to_unix
from plugins.customerio.track_limits import MAX_OPS_HARD_CAP, check_event_name


#: docs/customerio-track-v2.md §4.9 R16: the metrics a v2 delivery op can carry
V2_DELIVERY_METRICS = frozenset({"delivered", "opened", "converted"})
#: docs/customerio-track-v2.md §8: the metrics of the v1 metrics endpoint
V1_DELIVERY_METRICS = frozenset({"bounced", "clicked", "converted", "deferred", "delivered", "dropped", "opened",
                                 "spammed"})
#: docs/customerio-track-v2.md §4.1 step 2: traits that never become person attributes
_IDENTIFY_RESERVED = frozenset({"createdAt", "created_at", "object_type_id", "objectTypeId", "relationshipAttributes"})
#: docs/customerio-track-v2.md §4.5 step 1: traits that never become object attributes
_GROUP_RESERVED = frozenset({"object_type_id", "objectTypeId", "relationshipAttributes", "relationship_traits",
                             "objectAttributes", "created_at", "createdAt"})

#: builds the op of one call; a semantic mapper may return None for "map as R2"
Mapper = Callable[["TrackV2Mapping", dict[str, Any]], "dict[str, Any] | None"]



class TrackV2Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The settings of a ``customerio_track`` destination."""

    #: Workspace Settings > API Credentials; an all-digit value may come from YAML as a number
    site_id: str | int
    api_key: str | int
    region: str = "us"
    #: overrides the region's base URL (tests, proxies)
    endpoint: str | None = None
    convert_timestamps: bool = True
    detect_email_user_ids: bool = True
    event_id_mode: Literal["ulid", "message_id", "none"] = "ulid"
    max_ops_per_batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_OPS_HARD_CAP)] = 100
    #: docs/customerio-track-v2.md §8: delivery metrics v2 cannot carry go to /api/v1/metrics
    delivery_v1_fallback: bool = False

    def __post_init__(self) -> None:
        self.site_id, self.api_key = str(self.site_id), str(self.api_key)
        if not self.site_id or not self.api_key:
            raise ValueError("site_id and api_key are required (Workspace Settings > API Credentials)")
        self.region = check_region(self.region)


class TrackV2Mapping:
    """The mapping under one destination's settings."""

    def __init__(self, settings: TrackV2Settings) -> None:
        self.convert_attributes = settings.convert_timestamps
        self.detect_emails = settings.detect_email_user_ids
        self.event_id_mode = settings.event_id_mode
        self.v1_fallback = settings.delivery_v1_fallback

    def op_of(self, call: dict[str, Any]) -> dict[str, Any]:
        """The op of one call (docs/customerio-track-v2.md §3), or MappingError."""
        t = call.get("type")
        mapper = _TYPES.get(t) if isinstance(t, str) else None
        if mapper is None:
            raise MappingError("UNSUPPORTED_EVENT_TYPE", f"type {t!r} has no Track v2 op (R18)")
        op = mapper(self, call)
        assert op is not None  # only semantic mappers return None, and _track handles that
        return op

    # -- helpers ------------------------------------------------------------------

    def person_ref(self, s: str) -> dict[str, str]:
        return fields.person_ref(s, self.detect_emails)

    def _user(self, call: dict[str, Any]) -> dict[str, str]:
        """The semantic person ops: person_ref(userId) only (docs/customerio-track-v2.md §2.2)."""
        uid = fields.ident(call, "userId")
        if uid is None:
            raise MappingError("MISSING_IDENTIFIER", f"{call.get('event') or call.get('type')} requires userId")
        return self.person_ref(uid)

    def _convert(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """docs/customerio-track-v2.md §5.2 when ``convert_timestamps`` is on."""
        return convert_timestamps(attrs) if self.convert_attributes else attrs

    def _attributes(self, attrs: dict[str, Any], anonymous_id: str | None) -> dict[str, Any]:
        """ID-5 then §5.2 (docs/customerio-track-v2.md): ``anonymous_id`` wins over the
        same key in traits or properties."""
        if anonymous_id is not None:
            attrs["anonymous_id"] = anonymous_id
        return self._convert(attrs)

    # -- R1-R6 ----------------------------------------------------------------------

    def _identify(self, call: dict[str, Any]) -> dict[str, Any]:
        """R1 (docs/customerio-track-v2.md §4.1)."""
        traits = fields.obj(call.get("traits"))
        uid = fields.ident(call, "userId")
        if uid is not None:
            identifiers = self.person_ref(uid)
        elif (email := fields.email(traits.get("email"), "traits.email") or fields.context_email(call)) is not None:
            identifiers = {"email": email}
        else:
            raise MappingError("MISSING_IDENTIFIER", "identify requires userId or traits.email; anonymousId "
                                                     "alone cannot identify a person in Track v2")
        relationship = None
        object_id = fields.ident(traits, "objectId", "traits.objectId")
        if object_id is not None:
            rel_ids = {"object_type_id": fields.object_type_id(traits.get("object_type_id"),
                                                               traits.get("objectTypeId")),
                       "object_id": object_id}
            relationship = {"identifiers": rel_ids}
            rel_attrs = traits.get("relationshipAttributes")
            if isinstance(rel_attrs, dict) and rel_attrs:
                relationship["relationship_attributes"] = self._convert(rel_attrs)
        attrs = {k: v for k, v in traits.items() if k not in _IDENTIFY_RESERVED}
        created = fields.first(traits.get("created_at"), traits.get("createdAt"))
        if created is not None:
            attrs["created_at"] = created
        attrs = self._attributes(attrs, fields.ident(call, "anonymousId"))
        op: dict[str, Any] = {"type": "person", "action": "identify", "identifiers": identifiers}
        ts = to_unix(fields.when(call))
        if ts is not None:
            op["timestamp"] = ts
        if attrs:
            op["attributes"] = attrs
        if relationship is not None:
            op["cio_relationships"] = [relationship]
        return op

    def _person_activity(self, call: dict[str, Any], action: str, name: str | None) -> dict[str, Any]:
        """R2-R4 (docs/customerio-track-v2.md §4.2-§4.4): person event, page or screen.
        ``name`` None means page/screen resolution, which comes after the identifiers."""
        uid = fields.ident(call, "userId")
        anon = fields.ident(call, "anonymousId")
        if uid is not None:
            identifiers = self.person_ref(uid)
        elif anon is not None:
            identifiers = {"anonymous_id": anon}
        elif (email := fields.context_email(call)) is not None:
            identifiers = {"email": email}
        else:
            raise MappingError("MISSING_IDENTIFIER", f"{action} requires userId, anonymousId or "
                                                     "context.traits.email")
        props = fields.obj(call.get("properties"))
        if action == "event":
            assert name is not None
            check_event_name(name)
        elif action == "page":
            name = fields.name(props.get("url")) or fields.name(call.get("name"))
            if name is None:
                raise MappingError("MISSING_PAGE_NAME", "page requires properties.url or name")
        else:
            name = fields.name(call.get("name")) or fields.name(props.get("name"))
            if name is None:
                raise MappingError("MISSING_SCREEN_NAME", "screen requires name or properties.name")
        op: dict[str, Any] = {"type": "person", "action": action, "identifiers": identifiers, "name": name}
        event_id = fields.event_id(call, self.event_id_mode)
        if event_id is not None:
            op["id"] = event_id
        ts = to_unix(fields.when(call))
        if ts is not None:
            op["timestamp"] = ts
        attrs = self._attributes(dict(props), anon if "anonymous_id" not in identifiers else None)
        if attrs:
            op["attributes"] = attrs
        return op

    def _page(self, call: dict[str, Any]) -> dict[str, Any]:
        return self._person_activity(call, "page", None)

    def _screen(self, call: dict[str, Any]) -> dict[str, Any]:
        return self._person_activity(call, "screen", None)

    def _track(self, call: dict[str, Any]) -> dict[str, Any]:
        """A semantic event by its exact name (R7-R17), else R2 (docs/customerio-track-v2.md §3)."""
        event = fields.name(call.get("event"))
        if event is None:
            raise MappingError("MISSING_EVENT_NAME", "track requires an event name")
        semantic = _SEMANTIC.get(event)
        if semantic is not None:
            op = semantic(self, call)
            if op is not None:
                return op
        return self._person_activity(call, "event", event)

    def _group(self, call: dict[str, Any]) -> dict[str, Any]:
        """R5 (docs/customerio-track-v2.md §4.5); ``traits.relationship_traits`` is read
        when ``relationshipAttributes`` is missing (D-12)."""
        object_id = fields.ident(call, "groupId")
        if object_id is None:
            raise MappingError("MISSING_GROUP_ID", "group requires groupId")
        traits = fields.obj(call.get("traits"))
        ids = {"object_type_id": fields.object_type_id(traits.get("object_type_id"), traits.get("objectTypeId"),
                                                       call.get("objectTypeId")),
               "object_id": object_id}
        uid = fields.ident(call, "userId")
        anon = fields.ident(call, "anonymousId")
        attrs = {k: v for k, v in traits.items() if k not in _GROUP_RESERVED}
        created = fields.first(traits.get("created_at"), traits.get("createdAt"))
        if created is not None:
            attrs["created_at"] = created
        obj_attrs = traits.get("objectAttributes")
        if isinstance(obj_attrs, dict):
            attrs.update(obj_attrs)
        op: dict[str, Any] = {"type": "object", "action": "identify_anonymous" if uid is None and anon is not None
                              else "identify", "identifiers": ids}
        attrs = self._convert(attrs)
        if attrs:
            op["attributes"] = attrs
        if uid is not None or anon is not None:
            rel: dict[str, Any] = {"identifiers": self.person_ref(uid) if uid is not None
                                   else {"anonymous_id": anon}}
            rel_attrs = traits.get("relationshipAttributes")
            if rel_attrs is None:
                rel_attrs = traits.get("relationship_traits")
            if isinstance(rel_attrs, dict) and rel_attrs:
                rel["relationship_attributes"] = self._convert(rel_attrs)
            op["cio_relationships"] = [rel]
        return op

    def _alias(self, call: dict[str, Any]) -> dict[str, Any]:
        """R6 (docs/customerio-track-v2.md §4.6): no root ``identifiers``."""
        uid = fields.ident(call, "userId")
        prev = fields.ident(call, "previousId")
        if uid is None or prev is None:
            raise MappingError("MISSING_MERGE_IDENTIFIER", "alias requires both userId and previousId")
        return {"type": "person", "action": "merge", "primary": self.person_ref(uid),
                "secondary": self.person_ref(prev)}

    # -- semantic events (R7-R17) ---------------------------------------------------

    def _add_device(self, call: dict[str, Any]) -> dict[str, Any]:
        """R7 (docs/customerio-track-v2.md §4.7): errors in the order MISSING_IDENTIFIER,
        MISSING_DEVICE_TOKEN, INVALID_DEVICE_PLATFORM."""
        identifiers = self._user(call)
        maybe_token, platform_raw = fields.device(call)
        token = fields.require_token(maybe_token)
        platform = fields.platform(platform_raw)
        if platform is None:
            raise MappingError("INVALID_DEVICE_PLATFORM", f"device type {platform_raw!r} is not ios or android")
        return self._device_op(call, identifiers, token, platform)

    def _device_op(self, call: dict[str, Any], identifiers: dict[str, str], token: str,
                   platform: str) -> dict[str, Any]:
        device: dict[str, Any] = {"token": token, "platform": platform}
        last_used = to_unix(fields.when(call))
        if last_used is not None:
            device["last_used"] = last_used
        # docs/customerio-track-v2.md §4.7: no timestamp conversion in device attributes (D-15)
        attrs = {k: v for k, v in fields.obj(call.get("properties")).items() if k != "device"}
        version = fields.context(call, "app").get("version")
        if not fields.absent(version):
            attrs["app_version"] = version
        if attrs:
            device["attributes"] = attrs
        return {"type": "person", "action": "add_device", "identifiers": identifiers, "device": device}

    def _application_device(self, call: dict[str, Any]) -> dict[str, Any] | None:
        """R8: add_device only with userId, token and a valid platform; else the R2 event (D-14)."""
        uid = fields.ident(call, "userId")
        token, platform_raw = fields.device(call)
        platform = fields.platform(platform_raw)
        if uid is None or token is None or platform is None:
            return None
        return self._device_op(call, self.person_ref(uid), token, platform)

    def _delete_device(self, call: dict[str, Any]) -> dict[str, Any]:
        """R9, R10."""
        identifiers = self._user(call)
        token, _ = fields.device(call)
        return {"type": "person", "action": "delete_device", "identifiers": identifiers,
                "device": {"token": fields.require_token(token)}}

    def _object_ids(self, call: dict[str, Any]) -> dict[str, str]:
        """The object of Relationship Deleted and Object Deleted (docs/customerio-track-v2.md §2.2)."""
        props = fields.obj(call.get("properties"))
        object_id = fields.ident(props, "objectId", "properties.objectId")
        if object_id is None:
            raise MappingError("MISSING_OBJECT_ID", "properties.objectId is required")
        return {"object_type_id": fields.object_type_id(props.get("object_type_id"), props.get("objectTypeId")),
                "object_id": object_id}

    def _relationship_deleted(self, call: dict[str, Any]) -> dict[str, Any]:
        """R14: MISSING_OBJECT_ID before MISSING_IDENTIFIER."""
        ids = self._object_ids(call)
        return {"type": "object", "action": "delete_relationships", "identifiers": ids,
                "cio_relationships": [{"identifiers": self._user(call)}]}

    def _object_deleted(self, call: dict[str, Any]) -> dict[str, Any]:
        """R15: anonymousId is not needed."""
        return {"type": "object", "action": "delete", "identifiers": self._object_ids(call)}

    def _delivery(self, call: dict[str, Any]) -> dict[str, Any]:
        """R16 (docs/customerio-track-v2.md §4.9); §8 when ``delivery_v1_fallback`` is on."""
        props = fields.obj(call.get("properties"))
        delivery_id, metric = props.get("deliveryId"), props.get("metric")
        if fields.absent(delivery_id) or fields.absent(metric):
            raise MappingError("MISSING_DELIVERY_FIELDS", "properties.deliveryId and properties.metric are required")
        delivery_id = fields.id_str(delivery_id, "properties.deliveryId")
        token = fields.first(props.get("recipient"), fields.context(call, "device").get("token"))
        if not isinstance(metric, str):
            raise MappingError("UNSUPPORTED_IN_TRACK_V2", f"delivery metric {metric!r} is not a name")
        if metric in V2_DELIVERY_METRICS and token is not None:
            return {"type": "delivery", "action": "event", "identifiers": {"id": delivery_id}, "name": metric,
                    "attributes": {"device_token": token}}
        if self.v1_fallback and metric in V1_DELIVERY_METRICS:
            return v1_metric(call, props, delivery_id, metric)
        if metric not in V2_DELIVERY_METRICS:
            raise MappingError("UNSUPPORTED_IN_TRACK_V2", f"delivery metric {metric!r} has no Track v2 op "
                                                          "(delivered, opened, converted)")
        raise MappingError("MISSING_DEVICE_TOKEN", "properties.recipient or context.device.token is required")

    def _unsupported(self, call: dict[str, Any]) -> dict[str, Any]:
        """R17."""
        raise MappingError("UNSUPPORTED_IN_TRACK_V2", f"{call.get('event')!r} has no documented Track v2 op")


def v1_metric(call: dict[str, Any], props: dict[str, Any], delivery_id: str, metric: str) -> dict[str, Any]:
    """The v1 metrics body (docs/customerio-track-v2.md §8); ``delivery_id`` first,
    which is how ``send`` tells it from a v2 op."""
    ts = to_unix(fields.when(call))
    body: dict[str, Any] = {"delivery_id": delivery_id, "metric": metric,
                            "timestamp": ts if ts is not None else int(time.time())}
    for key in ("recipient", "reason", "href"):
        if not fields.absent(props.get(key)):
            body[key] = props[key]
    meta = {k: props[src] for k, src in (("action_name", "actionName"), ("action_value", "actionValue"))
            if not fields.absent(props.get(src))}
    if meta:
        body["metadata"] = meta
    return body


def _person_op(action: str) -> Mapper:
    """R11-R13 (docs/customerio-track-v2.md §4.8): an op that names the person and nothing else."""
    def build(mapping: TrackV2Mapping, call: dict[str, Any]) -> dict[str, Any]:
        return {"type": "person", "action": action, "identifiers": mapping._user(call)}
    return build


M = TrackV2Mapping
_TYPES: dict[str, Mapper] = {
    "identify": M._identify, "track": M._track, "page": M._page, "screen": M._screen,
    "group": M._group, "alias": M._alias,
}
#: docs/customerio-track-v2.md §3 R7-R17, matched exactly (case-sensitive)
_SEMANTIC: dict[str, Mapper] = {
    "Device Created or Updated": M._add_device,
    "Application Installed": M._application_device,
    "Application Opened": M._application_device,
    "Device Deleted": M._delete_device,
    "Application Uninstalled": M._delete_device,
    "User Deleted": _person_op("delete"),
    "User Suppressed": _person_op("suppress"),
    "User Unsuppressed": _person_op("unsuppress"),
    "Relationship Deleted": M._relationship_deleted,
    "Object Deleted": M._object_deleted,
    "Report Delivery Event": M._delivery,
    "Report Content Event": M._unsupported,
}
del M
