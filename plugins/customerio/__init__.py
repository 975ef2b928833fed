"""The Customer.io destinations, split by job:

- ``client``: what both share: the POST of a ``{"batch": [...]}`` body and the
  reading of Customer.io's answer (docs/customerio-apis.md);
- ``pipelines``: ``customerio_pipelines``, calls forwarded unchanged;
- ``track_v2``: ``customerio_track``, the destination that sends Track v2 ops,
  built from ``track_mapping`` (calls to ops), ``track_fields`` (reading a
  call's fields), ``timestamps`` and ``track_limits``
  (docs/customerio-track-v2.md).
"""

from __future__ import annotations

from gateway.api import Destination, hookimpl
from plugins.customerio.pipelines import CustomerioPipelinesDestination
from plugins.customerio.track_v2 import CustomerioTrackDestination

__all__ = ["CustomerioPipelinesDestination", "CustomerioTrackDestination", "register_destinations"]


@hookimpl
def register_destinations() -> list[type[Destination]]:
    return [CustomerioTrackDestination, CustomerioPipelinesDestination]
