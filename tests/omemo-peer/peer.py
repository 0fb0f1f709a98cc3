"""python-omemo interop peer for Coterie's integration tests.

A single OMEMO device (python-omemo 2.1.0 with both the oldmemo and the twomemo backend) driven over
stdin/stdout with JSON lines. There is no XMPP server: the driver pushes the remote devices' bundles in, and
whatever this device would publish (bundles, device lists) is kept in memory and returned by ``own``.
All state is in memory; every device is trusted. Logging goes to stderr only.

Usage: ``python peer.py --jid alice@example.org [--log-level DEBUG]``

Namespaces (NS): ``eu.siacs.conversations.axolotl`` (oldmemo) and ``urn:xmpp:omemo:2`` (twomemo).
XML is serialized with the oldmemo/twomemo ``etree`` helpers, using a default namespace declaration
(``<encrypted xmlns="NS">``).

Every command line gets exactly one reply line, ``{"ok":true,...}`` or
``{"ok":false,"error":"<ExceptionClassName>: <message>"}`` (plus ``"cause"`` with the same format when the
exception was raised ``from`` another one). Event lines may precede a reply:

* ``{"event":"ready","jid":J,"device_id":N}`` -- printed once at start-up.
* ``{"event":"sent","ns":NS,"to":J,"xml":"<encrypted ...>"}`` -- python-omemo sent a message on its own
  (key-exchange completion after decrypting a key exchange, the staleness heartbeat after more than 53
  received messages without replying, session replacement notifications). Deliver it to the peer if needed.

Commands:

* ``{"cmd":"own"}`` -> ``{"ok":true,"device_id":N,"identity_key":B64_ED25519,"bundles":{NS:XML},
  "device_lists":{NS:XML}}`` -- the currently published bundles (pre keys consumed/refilled as they were).
* ``{"cmd":"add_device","jid":J,"device_id":D,"bundles":{NS:XML,...}}`` -> ``{"ok":true}`` -- add D to J's
  device list for each given NS (the list is the union of all pushed devices) and make the bundle
  downloadable. Pushing again replaces the stored bundle. Device lists of JIDs never pushed are empty, so
  a message from an unknown device fails with SenderNotFound.
* ``{"cmd":"encrypt","ns":NS,"to":J,"body":TEXT}`` -> ``{"ok":true,"xml":XML,"errors":[...]}`` -- encrypt
  for all of J's devices in NS only. oldmemo plaintext is the UTF-8 body; twomemo plaintext is an XEP-0420
  envelope ``<envelope xmlns='urn:xmpp:sce:1'><content><body xmlns='jabber:client'>TEXT</body></content>
  <rpad>..</rpad><from jid='OWNJID'/></envelope>``. ``errors`` lists non-fatal per-device failures as
  ``{"ns","jid","device_id","error"}``.
* ``{"cmd":"decrypt","ns":NS,"from":J,"xml":XML}`` -> ``{"ok":true,"body":TEXT|null,"device_id":SENDER}``,
  for twomemo also ``"envelope":XML|null``. ``body`` is null for empty (key-only) messages.
* ``{"cmd":"lose_sessions","jid":J}`` -> ``{"ok":true}`` -- forget all sessions with J in both backends,
  keeping identity, device id and what is known about J's devices.
* ``{"cmd":"replace_sessions","jid":J,"device_id":D}`` -> ``{"ok":true,"replaced":[NS],"initiated":[NS],
  "errors":{NS:"Class: msg"}}`` -- calls SessionManager.replace_sessions, which only acts on namespaces
  that have a session with D (``replaced``). python-omemo does nothing for a namespace without a session,
  so for sessions forgotten by ``lose_sessions`` the peer builds a fresh session the same way
  (``initiated``). Each replaced/initiated session emits one ``sent`` event carrying the key exchange in an
  empty message.
* ``{"cmd":"quit"}`` -> ``{"ok":true}``, then exit 0 (EOF on stdin also exits 0).
"""

import argparse
import asyncio
import base64
import copy
import json
import logging
import secrets
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple
from xml.sax.saxutils import escape

import omemo
from omemo.types import DeviceInformation, DeviceList, TrustLevel
import oldmemo
import oldmemo.etree
import twomemo
import twomemo.etree

OLD_NS = oldmemo.oldmemo.NAMESPACE  # eu.siacs.conversations.axolotl
TWO_NS = twomemo.twomemo.NAMESPACE  # urn:xmpp:omemo:2
ETREE = {OLD_NS: oldmemo.etree, TWO_NS: twomemo.etree}
SCE_NS = "urn:xmpp:sce:1"
CLIENT_NS = "jabber:client"

log = logging.getLogger("omemo-peer")

# The protocol channel. sys.stdout is pointed at stderr in main() so stray prints cannot corrupt it.
OUT = sys.stdout


def emit(obj: Dict[str, Any]) -> None:
    OUT.write(json.dumps(obj) + "\n")
    OUT.flush()


def xml_to_str(element: ET.Element, ns: str) -> str:
    """Serialize with a default namespace declaration. (ET's own default_namespace option refuses the
    unqualified attributes, and the plain output would use ns0: prefixes.)"""
    element = copy.deepcopy(element)
    for child in element.iter():
        if child.tag.startswith(f"{{{ns}}}"):
            child.tag = child.tag[len(ns) + 2:]
    element.set("xmlns", ns)
    return ET.tostring(element, encoding="unicode")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class DictStorage(omemo.Storage):
    """In-memory key/value storage."""

    def __init__(self) -> None:
        super().__init__()
        self.data: Dict[str, omemo.JSONType] = {}

    async def _load(self, key: str) -> omemo.Maybe[omemo.JSONType]:
        return omemo.Just(self.data[key]) if key in self.data else omemo.Nothing()

    async def _store(self, key: str, value: omemo.JSONType) -> None:
        self.data[key] = value

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)


class PeerSessionManager(omemo.SessionManager):
    """SessionManager whose "server" is a pair of dicts fed by the driver and by our own uploads."""

    # SessionManager.create() instantiates the class without arguments and calls the upload/download hooks
    # before it returns, so the own JID has to be known at class level.
    OWN_JID = ""

    def __init__(self) -> None:
        super().__init__()
        # (ns, jid) -> device list; (ns, jid, device_id) -> bundle. Own entries are written by the uploads.
        self.device_lists: Dict[Tuple[str, str], DeviceList] = {}
        self.bundles: Dict[Tuple[str, str, int], omemo.Bundle] = {}

    async def _upload_bundle(self, bundle: omemo.Bundle) -> None:  # type: ignore[override]
        self.bundles[(bundle.namespace, bundle.bare_jid, bundle.device_id)] = bundle

    async def _download_bundle(  # type: ignore[override]
        self, namespace: str, bare_jid: str, device_id: int
    ) -> omemo.Bundle:
        try:
            return self.bundles[(namespace, bare_jid, device_id)]
        except KeyError:
            raise omemo.BundleNotFound(f"no {namespace} bundle pushed for {bare_jid}/{device_id}") from None

    async def _delete_bundle(self, namespace: str, device_id: int) -> None:  # type: ignore[override]
        self.bundles.pop((namespace, self.OWN_JID, device_id), None)

    async def _upload_device_list(  # type: ignore[override]
        self, namespace: str, device_list: DeviceList
    ) -> None:
        self.device_lists[(namespace, self.OWN_JID)] = dict(device_list)

    async def _download_device_list(  # type: ignore[override]
        self, namespace: str, bare_jid: str
    ) -> DeviceList:
        # A list that was never pushed/uploaded does not exist, which python-omemo wants reported as an empty
        # list (DeviceListDownloadFailed is for technical failures). An unknown sender thus gives
        # SenderNotFound in both namespaces.
        return dict(self.device_lists.get((namespace, bare_jid), {}))

    async def _evaluate_custom_trust_level(self, device: DeviceInformation) -> TrustLevel:
        levels = {"trusted": TrustLevel.TRUSTED, "distrusted": TrustLevel.DISTRUSTED,
                  "undecided": TrustLevel.UNDECIDED}
        try:
            return levels[device.trust_level_name]
        except KeyError:
            raise omemo.UnknownTrustLevel(device.trust_level_name) from None

    async def _make_trust_decision(
        self, undecided: FrozenSet[DeviceInformation], identifier: Optional[str]
    ) -> None:
        for device in undecided:  # blind trust; not reached with "trusted" as the initial level
            await self.set_trust(device.bare_jid, device.identity_key, "trusted")

    async def _send_message(self, message: omemo.Message, bare_jid: str) -> None:  # type: ignore[override]
        ns = message.namespace
        emit({"event": "sent", "ns": ns, "to": bare_jid,
              "xml": xml_to_str(ETREE[ns].serialize_message(message), ns)})


class Peer:
    def __init__(self, jid: str, manager: PeerSessionManager, backends: List[omemo.Backend]) -> None:
        self.jid = jid
        self.sm = manager
        self.backends = {backend.namespace: backend for backend in backends}
        # (ns, jid) -> device ids whose sessions lose_sessions forgot, for replace_sessions
        self.lost: Dict[Tuple[str, str], Set[int]] = {}

    @staticmethod
    def _check_ns(ns: str) -> str:
        if ns not in ETREE:
            raise omemo.UnknownNamespace(f"unknown namespace {ns!r}")
        return ns

    async def own(self, _cmd: Dict[str, Any]) -> Dict[str, Any]:
        device, _ = await self.sm.get_own_device_information()
        bundles, lists = {}, {}
        for ns, mod in ETREE.items():
            bundle = self.sm.bundles[(ns, self.jid, device.device_id)]
            bundles[ns] = xml_to_str(mod.serialize_bundle(bundle), ns)
            lists[ns] = xml_to_str(mod.serialize_device_list(self.sm.device_lists[(ns, self.jid)]), ns)
        return {"device_id": device.device_id, "identity_key": base64.b64encode(device.identity_key).decode(),
                "bundles": bundles, "device_lists": lists}

    async def add_device(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        jid, device_id = cmd["jid"], int(cmd["device_id"])
        parsed = {self._check_ns(ns): ETREE[ns].parse_bundle(ET.fromstring(xml), jid, device_id)
                  for ns, xml in cmd["bundles"].items()}  # parse everything before changing any state
        for ns, bundle in parsed.items():
            self.sm.bundles[(ns, jid, device_id)] = bundle
            device_list = self.sm.device_lists.setdefault((ns, jid), {})
            device_list.setdefault(device_id, None)
            await self.sm.update_device_list(ns, jid, dict(device_list))
        return {}

    async def encrypt(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        ns, to, body = self._check_ns(cmd["ns"]), cmd["to"], cmd["body"]
        if ns == TWO_NS:
            rpad = secrets.token_urlsafe(secrets.randbelow(150) + 1)
            from_jid = escape(self.jid, {"'": "&apos;"})
            plaintext = (f"<envelope xmlns='{SCE_NS}'><content><body xmlns='{CLIENT_NS}'>{escape(body)}</body>"
                         f"</content><rpad>{rpad}</rpad><from jid='{from_jid}'/></envelope>").encode("utf-8")
        else:
            plaintext = body.encode("utf-8")
        messages, errors = await self.sm.encrypt(frozenset([to]), {ns: plaintext}, backend_priority_order=[ns])
        message = next((m for m in messages if m.namespace == ns), None)
        if message is None:  # only possible when encrypting to the own JID without other own devices
            raise omemo.NoEligibleDevices(frozenset([to]), f"no {ns} device to encrypt for")
        return {"xml": xml_to_str(ETREE[ns].serialize_message(message), ns),
                "errors": [{"ns": e.namespace, "jid": e.bare_jid, "device_id": e.device_id,
                            "error": describe(e.exception)} for e in errors]}

    async def decrypt(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        ns, sender = self._check_ns(cmd["ns"]), cmd["from"]
        element = ET.fromstring(cmd["xml"])
        if element.tag != f"{{{ns}}}encrypted":
            raise ValueError(f"expected {{{ns}}}encrypted, got {element.tag}")
        if ns == OLD_NS:
            message = await oldmemo.etree.parse_message(element, sender, self.jid, self.sm)
        else:
            message = twomemo.etree.parse_message(element, sender)
        plaintext, device, _ = await self.sm.decrypt(message)
        reply: Dict[str, Any] = {"device_id": device.device_id}
        if ns == OLD_NS:
            reply["body"] = None if plaintext is None else plaintext.decode("utf-8")
            return reply
        reply["body"] = None
        reply["envelope"] = None if plaintext is None else plaintext.decode("utf-8")
        if plaintext is not None:
            body = ET.fromstring(plaintext).find(f"{{{SCE_NS}}}content/{{{CLIENT_NS}}}body")
            reply["body"] = None if body is None else (body.text or "")
        return reply

    async def lose_sessions(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        jid = cmd["jid"]
        devices = await self.sm.get_device_information(jid)
        for ns, backend in self.backends.items():
            had = {d.device_id for d in devices if await backend.load_session(jid, d.device_id) is not None}
            if had:  # Backend.purge_bare_jid raises KeyError if there is no session with jid at all
                self.lost.setdefault((ns, jid), set()).update(had)
                await backend.purge_bare_jid(jid)
        return {}

    async def replace_sessions(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        jid, device_id = cmd["jid"], int(cmd["device_id"])
        device = next((d for d in await self.sm.get_device_information(jid) if d.device_id == device_id), None)
        if device is None:
            raise LookupError(f"unknown device {jid}/{device_id}")
        with_session = {ns for ns, backend in self.backends.items()
                        if await backend.load_session(jid, device_id) is not None}
        # Only acts on namespaces with an existing session (and sends one key exchange for each).
        errors: Dict[str, BaseException] = dict(await self.sm.replace_sessions(device))

        # Sessions forgotten by lose_sessions: rebuild them the same way replace_sessions would.
        active = {ns for ns, is_active in device.active if is_active and ns in device.namespaces}
        initiated = []
        for ns in sorted(active - with_session):
            if device_id not in self.lost.get((ns, jid), set()):
                continue
            try:
                await self._initiate_session(self.backends[ns], jid, device_id)
            except omemo.OMEMOException as e:
                log.warning("session initiation for %s failed", ns, exc_info=True)
                errors[ns] = e
            else:
                initiated.append(ns)
                self.lost[(ns, jid)].discard(device_id)
        return {"replaced": sorted(with_session - set(errors)), "initiated": initiated,
                "errors": {ns: describe(e) for ns, e in errors.items()}}

    async def _initiate_session(self, backend: omemo.Backend, jid: str, device_id: int) -> None:
        """What SessionManager.replace_sessions does per namespace, for a device without a session."""
        content, plain_key_material = await backend.encrypt_empty()
        bundle = await self.sm._download_bundle(backend.namespace, jid, device_id)
        session, encrypted_key_material = await backend.build_session_active(
            jid, device_id, bundle, plain_key_material)
        own_device, _ = await self.sm.get_own_device_information()
        await self.sm._send_message(omemo.Message(
            backend.namespace, self.jid, own_device.device_id, content,
            frozenset({(encrypted_key_material, session.key_exchange)})), jid)
        await backend.store_session(session)


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def run(jid: str) -> int:
    storage = DictStorage()
    backends: List[omemo.Backend] = [twomemo.Twomemo(storage), oldmemo.Oldmemo(storage)]
    PeerSessionManager.OWN_JID = jid
    manager = await PeerSessionManager.create(backends, storage, jid, None, "trusted")
    # create() leaves the manager in history synchronization mode, which defers pre key deletion and the
    # automatic empty messages. A live client has no history to catch up on.
    await manager.after_history_sync()
    peer = Peer(jid, manager, backends)
    handlers = {"own": peer.own, "add_device": peer.add_device, "encrypt": peer.encrypt,
                "decrypt": peer.decrypt, "lose_sessions": peer.lose_sessions,
                "replace_sessions": peer.replace_sessions}

    own_device, _ = await manager.get_own_device_information()
    emit({"event": "ready", "jid": jid, "device_id": own_device.device_id})

    try:
        while True:
            line = await read_line()
            if not line:
                return 0  # EOF
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                name = cmd["cmd"]
                if name == "quit":
                    emit({"ok": True})
                    return 0
                if name not in handlers:
                    raise ValueError(f"unknown command {name!r}")
                log.debug("command: %s", cmd)
                reply = await handlers[name](cmd)
            except Exception as e:  # pylint: disable=broad-exception-caught
                log.info("command failed", exc_info=True)
                error: Dict[str, Any] = {"ok": False, "error": describe(e)}
                if e.__cause__ is not None:
                    error["cause"] = describe(e.__cause__)
                emit(error)
            else:
                emit({"ok": True, **reply})
    finally:
        await manager.shutdown()


def main() -> None:
    global OUT  # pylint: disable=global-statement
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jid", required=True, help="own bare JID")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    OUT = sys.stdout
    sys.stdout = sys.stderr
    sys.exit(asyncio.run(run(args.jid)))


if __name__ == "__main__":
    main()
