#!/usr/bin/env python3
"""A real XEP-0174 (link-local XMPP / "Bonjour") peer for tests: Debian's
finch (libpurple's prpl-bonjour), headless, inside a network namespace,
driven over libpurple's D-Bus API.

    python3 tests/finch/finch_peer.py --ns NS --name USER --host HOSTNAME --workdir DIR

Run from the root network namespace by root.  It enters NS itself (a fresh
mount and PID namespace inside it), starts a private D-Bus system bus,
avahi-daemon (host name HOSTNAME), a private D-Bus session bus and finch with a
Bonjour account USER@HOSTNAME, and then speaks JSON lines:

  stdout: {"ready": {"jid": "USER@HOSTNAME", "ip": "10.x.y.z"}}
          {"received": {"from": "bob@somehost", "body": "plain text"}}
          {"sent": {"to": "bob@somehost", "body": "hello"}}
          {"error": "..."}
  stdin:  {"send": {"to": "bob@somehost", "body": "hello"}}

It runs until stdin closes or it gets SIGTERM/SIGINT/SIGHUP and then stops
everything it started.  Everything (avahi, both buses, finch) lives in a PID
namespace whose init is this script's inner half, so even if the script is
SIGKILLed the kernel kills the rest, and the private /run mount disappears with
the mount namespace.

Logs in DIR: avahi.log, dbus-system.log, dbus-session.log, finch-debug.log
(finch -d: libpurple's debug log, including the raw XMPP bytes it receives),
finch-tty.log (the raw curses screen output).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

PURPLE_SERVICE = "im.pidgin.purple.PurpleService"
PURPLE_PATH = "/im/pidgin/purple/PurpleObject"
PURPLE_IFACE = "im.pidgin.purple.PurpleInterface"
SESSION_BUS_PATH = "/run/fz-session-bus"
SEND_WAIT_SECONDS = 30.0  # how long a send waits for the buddy to be seen


def emit(obj):
    """One JSON object per line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg):
    sys.stderr.write("finch_peer[%d]: %s\n" % (os.getpid(), msg))
    sys.stderr.flush()


def fail(msg, code=2):
    emit({"error": msg})
    log("error: " + msg)
    sys.exit(code)


# --------------------------------------------------------------------------
# Outer half: runs in the root namespace, checks, then supervises the inner
# half which runs inside NS.
# --------------------------------------------------------------------------

def python_with_dbus():
    """A python3 that has Debian's python3-dbus and python3-gi."""
    cands = [sys.executable, "/usr/bin/python3"]
    for py in cands:
        if not py or not os.path.exists(py):
            continue
        r = subprocess.run([py, "-c", "import dbus, dbus.mainloop.glib; from gi.repository import GLib"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return py
    return None


def set_pdeathsig(sig):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except Exception:
        pass


def outer(args, script=None, extra=()):
    """Check, then run SCRIPT --inner inside the namespace and supervise it."""
    script = os.path.abspath(script or __file__)
    if os.geteuid() != 0:
        fail("must run as root (needs ip netns exec, mount, unshare)")
    missing = [b for b in ("ip", "ss", "unshare", "mount", "umount", "dbus-daemon", "avahi-daemon",
                           "avahi-browse", "finch")
               if shutil.which(b) is None]
    if missing:
        fail("missing programs: %s (Debian packages: iproute2 util-linux dbus avahi-daemon "
             "avahi-utils finch)" % " ".join(missing))
    py = python_with_dbus()
    if py is None:
        fail("no python3 with the dbus and gi modules (apt-get install python3-dbus python3-gi); "
             "tried %s and /usr/bin/python3" % sys.executable)
    if not os.path.exists(os.path.join("/run/netns", args.ns)):
        fail("network namespace %r does not exist (ip netns add %s)" % (args.ns, args.ns))
    for v, what in ((args.name, "--name"), (args.host, "--host")):
        if not v or any(c in v for c in "@/ \t\n'\"<>&"):
            fail("bad %s %r" % (what, v))
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    cmd = ["ip", "netns", "exec", args.ns,
           "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
           "--kill-child=SIGKILL", "--mount-proc",
           py, script, "--inner",
           "--ns", args.ns, "--name", args.name, "--host", args.host,
           "--workdir", workdir, "--port", str(args.port),
           "--ready-timeout", str(args.ready_timeout)] + list(extra)

    def preexec():
        set_pdeathsig(signal.SIGKILL)  # we die -> unshare dies -> the PID namespace dies

    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec)

    def kill_hard(_signum, _frame):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def forward(_signum, _frame):
        # unshare ignores SIGTERM; the inner half (init of the PID ns) handles it
        # and cleans up.  If it has not finished in 20 s, SIGKILL the group:
        # unshare's --kill-child then takes the whole PID namespace down.
        # (No waiting here: child.wait() in the main thread returns when done.)
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        signal.signal(signal.SIGALRM, kill_hard)
        signal.alarm(20)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    rc = child.wait()
    signal.alarm(0)
    sys.exit(rc if rc >= 0 else 128 - rc)


# --------------------------------------------------------------------------
# Inner half: PID 1 of a fresh PID namespace, in a private mount namespace,
# inside network namespace NS.
# --------------------------------------------------------------------------

AVAHI_CONF = """[server]
host-name={host}
domain-name=local
browse-domains=
use-ipv4=yes
use-ipv6=no
allow-interfaces={ifaces}
enable-dbus=yes
disallow-other-stacks=no
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
publish-hinfo=no
publish-workstation=no
publish-addresses=yes
publish-aaaa-on-ipv4=no
publish-a-on-ipv6=no

[reflector]
enable-reflector=no

[rlimits]
"""

# libpurple's accounts.xml for a Bonjour account, enabled for finch's UI id
# ("gnt-purple") so that finch logs it in at start.
ACCOUNTS_XML = """<?xml version='1.0' encoding='UTF-8' ?>

<account version='1.0'>
 <account>
  <protocol>prpl-bonjour</protocol>
  <name>{jid}</name>
  <statuses>
   <status type='available' name='Available' active='true'>
    <attributes/>
   </status>
  </statuses>
  <settings>
   <setting name='first' type='string'>{first}</setting>
   <setting name='last' type='string'></setting>
   <setting name='port' type='int'>{port}</setting>
  </settings>
  <settings ui='gnt-purple'>
   <setting name='auto-login' type='bool'>1</setting>
  </settings>
 </account>
</account>
"""


class Inner:
    def __init__(self, args):
        self.args = args
        self.workdir = args.workdir
        self.jid = "%s@%s" % (args.name, args.host)
        self.procs = []          # (name, Popen) in start order
        self.mounted = []
        self.pty_master = None
        self.loop = None
        self.purple = None
        self.account = None
        self.stdin_buf = b""
        self.stopping = False
        self.ready = False

    # ---- helpers -------------------------------------------------------
    def path(self, *p):
        return os.path.join(self.workdir, *p)

    def spawn(self, name, argv, env=None, stdout=None, stderr=None, stdin=subprocess.DEVNULL,
              **kw):
        p = subprocess.Popen(argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                             start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def wait_for(self, what, cond, timeout, interval=0.1, dead=None):
        deadline = time.time() + timeout
        while True:
            r = cond()
            if r:
                return r
            if dead is not None and dead.poll() is not None:
                raise RuntimeError("%s: process exited with %s" % (what, dead.returncode))
            if time.time() > deadline:
                raise RuntimeError("timed out after %.0fs waiting for %s" % (timeout, what))
            time.sleep(interval)

    @staticmethod
    def file_has(path, text):
        try:
            with open(path, "rb") as f:
                return text.encode() in f.read()
        except OSError:
            return False

    # ---- setup ---------------------------------------------------------
    def setup(self):
        self.setup_avahi()
        self.setup_finch()

    def setup_avahi(self):
        """Private /run, system bus and avahi-daemon (host name --host)."""
        a = self.args
        os.makedirs(self.workdir, exist_ok=True)
        # Private /run: avahi's pid file and the system bus socket are fixed paths.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=16m", "fzrun", "/run"],
                       check=True)
        self.mounted.append("/run")
        os.makedirs("/run/dbus", exist_ok=True)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=False)

        ip = self.own_ip()
        if not ip:
            raise RuntimeError("no IPv4 address in network namespace %s" % a.ns)
        self.ip, self.iface = ip

        # 1. system bus (for avahi-daemon and libpurple's avahi client)
        sysbus = self.spawn("dbus-system", ["dbus-daemon", "--system", "--nofork", "--nopidfile",
                                            "--nosyslog"],
                            stdout=open(self.path("dbus-system.log"), "wb"),
                            stderr=subprocess.STDOUT)
        self.wait_for("the private system bus", lambda: os.path.exists("/run/dbus/system_bus_socket"),
                      10, dead=sysbus)

        # 2. avahi-daemon
        conf = self.path("avahi-daemon.conf")
        with open(conf, "w") as f:
            f.write(AVAHI_CONF.format(host=a.host, ifaces=self.iface))
        avahi_log = self.path("avahi.log")
        avahi = self.spawn("avahi-daemon", ["avahi-daemon", "--no-drop-root", "--no-chroot",
                                            "--no-rlimits", "-f", conf],
                           stdout=open(avahi_log, "wb"), stderr=subprocess.STDOUT)
        self.wait_for("avahi-daemon startup (see %s)" % avahi_log,
                      lambda: self.file_has(avahi_log, "Server startup complete"), 20, dead=avahi)
        if not self.file_has(avahi_log, "Host name is %s.local" % a.host):
            raise RuntimeError("avahi-daemon did not take host name %s.local (see %s)"
                               % (a.host, avahi_log))

    def setup_finch(self):
        a = self.args
        # 3. session bus for finch's D-Bus API
        sess = self.spawn("dbus-session", ["dbus-daemon", "--session", "--nofork", "--nopidfile",
                                           "--nosyslog", "--address=unix:path=" + SESSION_BUS_PATH],
                          stdout=open(self.path("dbus-session.log"), "wb"),
                          stderr=subprocess.STDOUT)
        self.wait_for("the private session bus", lambda: os.path.exists(SESSION_BUS_PATH), 10,
                      dead=sess)
        self.bus_address = "unix:path=" + SESSION_BUS_PATH

        # 4. finch, on a pty of its own
        # libpurple binds its IPv4 listener without SO_REUSEADDR: if the port
        # still has TIME-WAIT sockets (a previous peer in this namespace) it
        # silently falls back to a random IPv4 port while still advertising the
        # requested one.  So pick a port nothing in this namespace uses.
        self.port = a.port
        while self.port_in_use(self.port):
            log("port %d busy in %s (e.g. TIME-WAIT), trying %d" % (self.port, a.ns, self.port + 1))
            self.port += 1
        conf_dir = self.path("purple")
        shutil.rmtree(conf_dir, ignore_errors=True)
        os.makedirs(conf_dir)
        home = self.path("home")
        os.makedirs(home, exist_ok=True)
        with open(os.path.join(conf_dir, "accounts.xml"), "w") as f:
            f.write(ACCOUNTS_XML.format(jid=self.jid, first=a.name, port=self.port))
        self.start_finch(conf_dir, home)

        # 5. D-Bus: find the account, wait until it is connected and published.
        import dbus
        from dbus.mainloop.glib import DBusGMainLoop
        DBusGMainLoop(set_as_default=True)
        self.bus = dbus.bus.BusConnection(self.bus_address)
        self.wait_for("finch on D-Bus (%s)" % PURPLE_SERVICE,
                      lambda: self.bus.name_has_owner(PURPLE_SERVICE), 30, dead=self.finch)
        obj = self.bus.get_object(PURPLE_SERVICE, PURPLE_PATH)
        self.purple = dbus.Interface(obj, PURPLE_IFACE)
        self.account = self.wait_for("account %s in libpurple" % self.jid,
                                     lambda: int(self.purple.PurpleAccountsFind(self.jid, "prpl-bonjour")),
                                     20, dead=self.finch)
        self.wait_for("account %s to connect (see finch-debug.log)" % self.jid,
                      lambda: int(self.purple.PurpleAccountIsConnected(self.account)), a.ready_timeout,
                      interval=0.2, dead=self.finch)
        self.bus.add_signal_receiver(self.on_received_im, dbus_interface=PURPLE_IFACE,
                                     signal_name="ReceivedImMsg")
        published = self.wait_for("_presence._tcp %s to be published" % self.jid,
                                  self.own_presence, a.ready_timeout, interval=0.3, dead=self.finch)
        self.jid, adv_port = published
        bound = self.port_in_use(adv_port, listening=True)
        if not bound:
            raise RuntimeError("finch advertises port %s but nothing listens there on IPv4 "
                               "(see finch-debug.log 'Bound IPv4 socket')" % adv_port)
        self.ready = True
        emit({"ready": {"jid": self.jid, "ip": self.ip, "port": int(adv_port)}})

    def own_ip(self):
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            # "2: eth0    inet 10.77.5.10/24 brd ... scope global eth0"
            if "inet" in parts:
                i = parts.index("inet")
                return parts[i + 1].split("/")[0], parts[1].rstrip(":").split("@")[0]
        return None

    @staticmethod
    def port_in_use(port, listening=False):
        """Any TCP socket (any state) with local port PORT; or, with
        listening=True, an IPv4 listener on PORT."""
        argv = ["ss", "-Htan"]
        if listening:
            argv = ["ss", "-Htan4", "state", "listening"]
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        for line in out.splitlines():
            local = next((f for f in line.split() if ":" in f), "")
            if local.rsplit(":", 1)[-1] == str(port):
                return True
        return False

    def start_finch(self, conf_dir, home):
        import pty
        import fcntl
        import struct
        import termios
        import threading
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home,
            "TERM": "xterm",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "DBUS_SESSION_BUS_ADDRESS": "unix:path=" + SESSION_BUS_PATH,
            "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/run/dbus/system_bus_socket",
            "PURPLE_UNSAFE_DEBUG": "1",  # keep message bodies in the debug log
        }
        dbg = open(self.path("finch-debug.log"), "wb")

        def child_setup():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.finch = subprocess.Popen(["finch", "-d", "-c", conf_dir], env=env, cwd=home,
                                      stdin=slave, stdout=slave, stderr=dbg,
                                      preexec_fn=child_setup, close_fds=True)
        self.procs.append(("finch", self.finch))
        os.close(slave)
        self.pty_master = master
        tty_log = open(self.path("finch-tty.log"), "wb")

        def drain():
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                tty_log.write(data)
                tty_log.flush()

        threading.Thread(target=drain, daemon=True).start()

    def own_presence(self):
        """The name under which our _presence._tcp is resolvable, or None."""
        for name, host, addr, port, txt in browse_presence():
            if addr == self.ip and (name == self.jid or name.startswith(self.args.name + "@")):
                return name, int(port)
        return None

    # ---- running ---------------------------------------------------------
    def on_received_im(self, account, sender, message, conv, flags):
        if int(account) != self.account:
            return
        emit({"received": {"from": str(sender), "body": strip_html(str(message))}})

    def on_stdin(self, fd, cond):
        from gi.repository import GLib
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            self.stop("stdin closed")
            return False
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            line = line.strip()
            if not line:
                continue
            try:
                cmd = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                emit({"error": "bad command line %r: %s" % (line[:200], e)})
                continue
            if isinstance(cmd, dict) and isinstance(cmd.get("send"), dict):
                s = cmd["send"]
                to, body = s.get("to"), s.get("body")
                if not isinstance(to, str) or not isinstance(body, str):
                    emit({"error": "send needs string 'to' and 'body'"})
                    continue
                self.send_when_buddy_seen(to, body, time.time() + SEND_WAIT_SECONDS)
            else:
                emit({"error": "unknown command: %s" % line[:200].decode("utf-8", "replace")})
        return True

    def buddy_online(self, to):
        b = int(self.purple.PurpleFindBuddy(self.account, to))
        if not b:
            return False
        pres = int(self.purple.PurpleBuddyGetPresence(b))
        return bool(pres and int(self.purple.PurplePresenceIsOnline(pres)))

    def send_when_buddy_seen(self, to, body, deadline):
        from gi.repository import GLib
        try:
            online = self.buddy_online(to)
        except Exception as e:  # D-Bus trouble
            emit({"error": "send to %s: %s" % (to, e)})
            return False
        if not online:
            if time.time() > deadline:
                emit({"error": "send to %s: buddy not seen online within %.0fs (is its "
                               "_presence._tcp published and resolvable?)" % (to, SEND_WAIT_SECONDS)})
                return False
            GLib.timeout_add(200, self.send_when_buddy_seen, to, body, deadline)
            return False
        try:
            conv = self.purple.PurpleConversationNew(1, self.account, to)  # 1 = PURPLE_CONV_TYPE_IM
            im = self.purple.PurpleConvIm(conv)
            # libpurple takes HTML here; escape so the peer gets the literal text.
            self.purple.PurpleConvImSend(im, html_escape(body))
        except Exception as e:
            emit({"error": "send to %s: %s" % (to, e)})
            return False
        emit({"sent": {"to": to, "body": body}})
        return False

    def stop(self, why):
        if not self.stopping:
            self.stopping = True
            log("stopping: " + why)
        if self.loop is not None:
            self.loop.quit()
        return False

    def run(self):
        from gi.repository import GLib
        self.loop = GLib.MainLoop()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, s, self.stop, "signal %d" % s)
        GLib.io_add_watch(0, GLib.PRIORITY_DEFAULT, GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR,
                          self.on_stdin)

        def watch_finch():
            if self.finch.poll() is not None:
                emit({"error": "finch exited with status %s (see %s)"
                      % (self.finch.returncode, self.path("finch-debug.log"))})
                self.exit_code = 1
                self.stop("finch died")
                return False
            return True
        GLib.timeout_add(500, watch_finch)
        self.exit_code = 0
        self.loop.run()
        return self.exit_code

    def cleanup(self):
        # Ask finch to quit first (logs out: withdraws its _presence._tcp and
        # ends open streams), then reverse start order: finch, session bus,
        # avahi (sends goodbyes), system bus.
        finch = getattr(self, "finch", None)
        if self.purple is not None and finch is not None and finch.poll() is None:
            try:
                self.purple.PurpleCoreQuit(ignore_reply=True)
                finch.wait(timeout=5)
            except Exception:
                pass
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
        if self.pty_master is not None:
            try:
                os.close(self.pty_master)
            except OSError:
                pass
        for m in reversed(self.mounted):
            subprocess.run(["umount", "-l", m], check=False)


def browse_presence():
    """[(instance name, host, address, port, txt)] of resolved _presence._tcp services."""
    try:
        out = subprocess.run(["avahi-browse", "-p", "-r", "-t", "_presence._tcp"],
                             capture_output=True, text=True, timeout=15).stdout
    except subprocess.TimeoutExpired:
        return []
    res = []
    for line in out.splitlines():
        f = line.split(";")
        if len(f) >= 10 and f[0] == "=":
            res.append((avahi_unescape(f[3]), f[6], f[7], f[8], ";".join(f[9:])))
    return res


def avahi_unescape(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4])))
            i += 4
        elif s[i] == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def html_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def strip_html(s):
    import html
    import re
    s = re.sub(r"(?i)<br\s*/?>", "\n", s)
    s = re.sub(r"<[^>]*>", "", s)
    return html.unescape(s)


def inner_main(args):
    inner = Inner(args)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    rc = 1
    try:
        try:
            inner.setup()
        except SystemExit:
            raise
        except Exception as e:
            emit({"error": "startup failed: %s" % e})
            log("startup failed: %s (logs in %s)" % (e, args.workdir))
            return 1
        rc = inner.run()
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        inner.cleanup()
    return rc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", required=True, help="network namespace (must exist)")
    ap.add_argument("--name", required=True, help="user part of the Bonjour name")
    ap.add_argument("--host", required=True, help="mDNS host name (avahi host-name)")
    ap.add_argument("--workdir", required=True, help="directory for config and logs")
    ap.add_argument("--port", type=int, default=5298, help="XMPP listening port (5298)")
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        sys.exit(inner_main(args))
    outer(args)


if __name__ == "__main__":
    main()
