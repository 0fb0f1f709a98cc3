"""A friend on ordinary XMPP, for Coterie's bridge tests: slixmpp with slixmpp-omemo (python-omemo with
the oldmemo and twomemo backends), as Conversations, Dino or Gajim would behave on the wire.

Driven over stdin/stdout with JSON lines. Logging goes to stderr only and never contains a message body.

Usage: ``python friend.py --jid friend@example.test --server 127.0.0.1:5222 --ca-file ca.pem
--data DIR [--omemo both|0.3]`` with the password in ``FRIEND_PASSWORD``.

``--omemo 0.3`` makes a friend whose client knows only OMEMO 0.3 (``eu.siacs.conversations.axolotl``), as
older Conversations and Gajim releases; ``both`` (the default) publishes and speaks OMEMO 2
(``urn:xmpp:omemo:2``, XEP-0420 envelope) and 0.3, choosing per device as slixmpp-omemo does. The server's
certificate is checked against ``--ca-file`` and the JID's domain. OMEMO state lives in ``DIR/omemo.json``,
so a friend started again with the same ``--data`` is the same device. Every device is trusted (blind trust
before verification), as the clients do by default.

Events (stdout):

* ``{"event":"online","jid":FULLJID,"device_id":N}`` once logged in, with OMEMO ready (keys published).
* ``{"event":"message","from":BAREJID,"id":ID,"ns":[NS...],"encrypted":BOOL,"body":TEXT|null}`` for every
  chat message with a body or an OMEMO element; ``ns`` are the OMEMO namespaces it carried.
* ``{"event":"error","error":TEXT}`` for a message that could not be decrypted.

Commands (stdin), each answered by one line ``{"ok":true,...}`` or ``{"ok":false,"error":TEXT}``:

* ``{"cmd":"send","to":J,"body":T}`` -> ``{"ok":true,"ns":[NS...],"id":ID}``: OMEMO-encrypted.
* ``{"cmd":"rtt","to":J,"n":N,"size":BYTES}`` -> ``{"ok":true,"ms":[...]}``: N round trips to an
  echoing peer (one started with ``--echo``, which answers every message with ``echo:`` + its body).
* ``{"cmd":"quit"}``: disconnect and exit 0 (EOF on stdin does the same).
"""

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import time
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional

import oldmemo
import oldmemo.etree
import twomemo
import twomemo.etree
from omemo.storage import Just, Maybe, Nothing, Storage
from omemo.types import DeviceInformation, JSONType
from slixmpp.clientxmpp import ClientXMPP
from slixmpp.jid import JID  # pylint: disable=no-name-in-module
from slixmpp.plugins import register_plugin  # type: ignore[attr-defined]
from slixmpp.stanza import Message
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath
import slixmpp_omemo.xep_0384 as xep_0384_module
from slixmpp_omemo import TrustLevel, XEP_0384

log = logging.getLogger("friend")

NS_OLD = "eu.siacs.conversations.axolotl"
NS_TWO = "urn:xmpp:omemo:2"
SCE_NS = "urn:xmpp:sce:1"
CLIENT_NS = "jabber:client"


def emit(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class JsonStorage(Storage):
    """python-omemo storage in one JSON file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.data: Dict[str, JSONType] = {}
        if path.exists():
            self.data = json.loads(path.read_text(encoding="utf8"))

    async def _load(self, key: str) -> Maybe[JSONType]:
        return Just(self.data[key]) if key in self.data else Nothing()

    async def _store(self, key: str, value: JSONType) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data), encoding="utf8")

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)
        self.path.write_text(json.dumps(self.data), encoding="utf8")


class Omemo(XEP_0384):  # pylint: disable=invalid-name
    """slixmpp-omemo with JSON storage and blind trust."""

    default_config = {"fallback_message": "This message is OMEMO encrypted.", "json_file_path": None}

    def plugin_init(self) -> None:
        self.__storage = JsonStorage(Path(self.json_file_path))  # pylint: disable=attribute-defined-outside-init
        super().plugin_init()

    @property
    def storage(self) -> Storage:
        return self.__storage

    @property
    def _btbv_enabled(self) -> bool:
        return True

    async def _devices_blindly_trusted(
        self, blindly_trusted: FrozenSet[DeviceInformation], identifier: Optional[str]
    ) -> None:
        log.info("trusted blindly: %d devices", len(blindly_trusted))

    async def _prompt_manual_trust(
        self, manually_trusted: FrozenSet[DeviceInformation], identifier: Optional[str]
    ) -> None:
        session_manager = await self.get_session_manager()
        for device in manually_trusted:
            await session_manager.set_trust(device.bare_jid, device.identity_key, TrustLevel.TRUSTED.value)


async def prepare_old_only(  # pylint: disable=too-many-arguments
    xmpp: Any,
    xep_0384: Any,
    storage: Storage,
    legacy_storage: Any,
    signed_pre_key_rotation_period: int = 7 * 24 * 60 * 60,
    pre_key_refill_threshold: int = 99,
    max_num_per_session_skipped_keys: int = 1000,
    max_num_per_message_skipped_keys: Optional[int] = None,
) -> Any:
    """slixmpp-omemo's `_prepare` with the oldmemo backend only: a client that knows OMEMO 0.3 alone."""
    del legacy_storage
    session_manager = await xep_0384_module._make_session_manager(  # pylint: disable=protected-access
        xmpp, xep_0384
    ).create(
        [oldmemo.Oldmemo(storage, max_num_per_session_skipped_keys, max_num_per_message_skipped_keys)],
        storage,
        xmpp.boundjid.bare,
        initial_own_label=None,
        undecided_trust_level_name=TrustLevel.UNDECIDED.value,
        signed_pre_key_rotation_period=signed_pre_key_rotation_period,
        pre_key_refill_threshold=pre_key_refill_threshold,
    )
    await session_manager.ensure_data_consistency()
    await session_manager.after_history_sync()
    return session_manager


class Friend(ClientXMPP):
    """The client: logs in, announces OMEMO, reports messages, sends on command."""

    def __init__(self, jid: str, password: str, omemo_versions: str, echo: bool) -> None:
        super().__init__(jid, password)
        self.omemo_versions = omemo_versions
        self.echo = echo
        # (sender, body) -> a future the rtt command waits on.
        self.waiters: Dict[Any, "asyncio.Future[None]"] = {}
        self.ready = asyncio.Event()
        self.add_event_handler("session_start", self.on_start)
        # Not the "message" event: slixmpp raises it only for messages with
        # a body, and OMEMO messages need none.
        self.register_handler(
            CoroutineCallback("Messages", MatchXPath(f"{{{self.default_ns}}}message"), self.on_message)
        )
        self.add_event_handler("failed_auth", lambda _: fail("the server refused the login"))

    async def on_start(self, _event: Any) -> None:
        self.send_presence()
        omemo: XEP_0384 = self.plugin["xep_0384"]
        session_manager = await omemo.get_session_manager()
        info = await session_manager.get_own_device_information()
        emit({"event": "online", "jid": str(self.boundjid), "device_id": info[0].device_id})
        self.ready.set()

    async def on_message(self, stanza: Message) -> None:
        if stanza["type"] not in ("chat", "normal"):
            return
        omemo: XEP_0384 = self.plugin["xep_0384"]
        namespaces = sorted(omemo.is_encrypted(stanza))
        sender = stanza["from"].bare
        base = {"from": sender, "id": stanza["id"], "ns": namespaces}
        if not namespaces:
            if stanza["body"]:
                emit({"event": "message", **base, "encrypted": False, "body": stanza["body"]})
            return
        try:
            body = await self.decrypt(stanza, sender)
        except Exception as e:  # pylint: disable=broad-exception-caught
            log.warning("could not decrypt a message: %s", type(e).__name__)
            emit({"event": "error", **base, "error": f"{type(e).__name__}: {e}"})
            return
        emit({"event": "message", **base, "encrypted": True, "body": body})
        waiter = self.waiters.pop((sender, body), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.echo and body and not body.startswith("echo:"):
            await self.send_encrypted(sender, "echo:" + body)

    async def rtt(self, to: str, n: int, size: int) -> List[float]:
        """n round trips to an echoing peer: send, wait for the echo; milliseconds each."""
        loop = asyncio.get_running_loop()
        times = []
        for i in range(n):
            body = f"rtt {i} ".ljust(size, "x")
            fut: "asyncio.Future[None]" = loop.create_future()
            self.waiters[(JID(to).bare, "echo:" + body)] = fut
            start = time.perf_counter()
            await self.send_encrypted(to, body)
            await asyncio.wait_for(fut, 30)
            times.append((time.perf_counter() - start) * 1000)
        return times

    async def decrypt(self, stanza: Message, sender: str) -> Optional[str]:
        """The body: OMEMO 2 (its XEP-0420 envelope, whose <from/> must be the sender) when the message has
        it, else 0.3. slixmpp-omemo 2.2 leaves SCE to the application, so OMEMO 2 goes through its session
        manager directly."""
        omemo: XEP_0384 = self.plugin["xep_0384"]
        session_manager = await omemo.get_session_manager()
        two = stanza.xml.find(f"{{{NS_TWO}}}encrypted")
        if two is None:
            message, _device = await omemo.decrypt_message(stanza)
            return message["body"] or None
        plaintext, _device, _ = await session_manager.decrypt(twomemo.etree.parse_message(two, sender))
        if plaintext is None:
            return None
        envelope = ET.fromstring(plaintext)
        origin = envelope.find(f"{{{SCE_NS}}}from")
        if origin is None or JID(origin.get("jid", "")).bare != sender:
            raise ValueError("the envelope's <from/> is not the sender")
        body = envelope.find(f"{{{SCE_NS}}}content/{{{CLIENT_NS}}}body")
        return None if body is None else (body.text or "")

    async def send_encrypted(self, to: str, body: str) -> Dict[str, Any]:
        """Encrypts for every device of `to`: OMEMO 2 (an XEP-0420 envelope) where the device has it, else
        0.3 (the body), with a fallback body, the store hint and the XEP-0380 marker, as the clients do."""
        omemo: XEP_0384 = self.plugin["xep_0384"]
        session_manager = await omemo.get_session_manager()
        # Across the loaded backends only (a 0.3-only client has no OMEMO 2 backend).
        await session_manager.refresh_device_lists(JID(to).bare)
        own = self.boundjid.bare
        plaintexts: Dict[str, bytes] = {NS_OLD: body.encode("utf-8")}
        if self.omemo_versions == "both":
            rpad = secrets.token_urlsafe(secrets.randbelow(150) + 1)
            plaintexts[NS_TWO] = (
                f"<envelope xmlns='{SCE_NS}'><content><body xmlns='{CLIENT_NS}'>{escape(body)}</body>"
                f"</content><rpad>{rpad}</rpad><from jid='{escape(own, {chr(39): '&apos;'})}'/></envelope>"
            ).encode("utf-8")
        messages, errors = await session_manager.encrypt(
            frozenset([JID(to).bare]),
            plaintexts,
            backend_priority_order=[ns for ns in (NS_TWO, NS_OLD) if ns in plaintexts],
        )
        if errors:
            log.info("non-critical encryption errors: %d", len(errors))
        if not messages:
            raise RuntimeError("nothing to send: the recipient has no usable device")
        stanza = self.make_message(mto=JID(to), mtype="chat")
        stanza["body"] = "This message is OMEMO encrypted."
        stanza.enable("store")
        namespaces = []
        for m in messages:
            if m.namespace == NS_TWO:
                stanza.append(twomemo.etree.serialize_message(m))
            else:
                stanza.append(oldmemo.etree.serialize_message(m))
            namespaces.append(m.namespace)
        stanza["eme"]["namespace"] = namespaces[0]
        stanza["eme"]["name"] = "OMEMO"
        stanza.send()
        return {"ns": sorted(namespaces), "id": stanza["id"]}


def fail(why: str) -> None:
    emit({"event": "fatal", "error": why})
    sys.stdout.flush()
    os._exit(3)  # pylint: disable=protected-access


async def commands(friend: Friend) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
            await friend.ready.wait()
            if cmd["cmd"] == "send":
                out = await friend.send_encrypted(cmd["to"], cmd["body"])
                emit({"ok": True, **out})
            elif cmd["cmd"] == "rtt":
                times = await friend.rtt(cmd["to"], int(cmd["n"]), int(cmd.get("size", 100)))
                emit({"ok": True, "ms": times})
            elif cmd["cmd"] == "quit":
                emit({"ok": True})
                break
            else:
                emit({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
        except Exception as e:  # pylint: disable=broad-exception-caught
            emit({"ok": False, "error": f"{type(e).__name__}: {e}"})
    friend.disconnect()
    await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--jid", required=True)
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--ca-file", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--omemo", choices=["both", "0.3"], default="both")
    parser.add_argument("--echo", action="store_true", help="answer every message with 'echo:' + its body")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    password = os.environ.get("FRIEND_PASSWORD")
    if not password:
        parser.error("set FRIEND_PASSWORD")
    args.data.mkdir(parents=True, exist_ok=True)
    if args.omemo == "0.3":
        xep_0384_module._prepare = prepare_old_only  # type: ignore[assignment]  # pylint: disable=protected-access

    # slixmpp binds to the event loop current when the client is made.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    register_plugin(Omemo)
    friend = Friend(args.jid, password, args.omemo, args.echo)
    friend.ca_certs = args.ca_file
    friend.register_plugin("xep_0199")
    friend.register_plugin("xep_0380")
    friend.register_plugin("xep_0384", {"json_file_path": str(args.data / "omemo.json")}, module=sys.modules[__name__])
    host, port = args.server.rsplit(":", 1)
    friend.connect(host=host, port=int(port))
    loop.run_until_complete(commands(friend))


if __name__ == "__main__":
    main()
