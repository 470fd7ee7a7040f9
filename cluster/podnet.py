"""The pod network of the process kubelet (cluster/kubelet.py): a bridge, a netns per pod, hosts files.

    host                                  pod netns (one per pod, `ip netns`)
    cdst0  10.244.0.1/24  (gateway)  <-veth->  eth0 10.244.0.N/24, lo
           10.96.0.1/32   (the `kubernetes` Service IP: a TCP forwarder to the apiserver)

Pods reach each other over the bridge (plain L2) and the host only at the addresses on the
bridge: a pod has a route to its /24 and to the service range via the gateway, no default route,
so nothing a pod sends can leave these interfaces (and ip_forward stays as it is). A host service
that pods must reach (the apiserver, an S3 server) has to listen on the bridge IP, or be exposed
there with `Forwarders.add` (the kubelet's `expose()`); 127.0.0.1 inside a pod is the pod's own
loopback. IPv6 is switched off on every interface made here, so no link-local chatter.

`ip netns exec NS` bind-mounts every file of /etc/netns/NS/ over /etc/ (hosts, resolv.conf,
hostname) in the process's mount namespace. The kubelet rewrites those files *in place* (same
inode, O_TRUNC + one write), because a bind mount pins the inode: a rename-replace would leave
running pods looking at the old file.

Everything made is recorded (`state()`), so a kubelet that died can be cleaned up by another
process (`cleanup(state)`): veths are deleted explicitly, because a deleted netns only frees its
end of the pair once the kernel gets round to destroying the namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import socket
import subprocess
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ETC_NETNS = Path("/etc/netns")
RUN_NETNS = Path("/run/netns")
IP = "/usr/sbin/ip"


class NetError(RuntimeError):
    pass


def _ip(*args: str, stdin: str | None = None) -> str:
    r = subprocess.run([IP, *args], input=stdin, capture_output=True, text=True)
    if r.returncode:
        raise NetError(f"ip {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _no_ipv6(conf_dir: Path) -> None:
    with contextlib.suppress(OSError):  # a kernel without IPv6 has nothing to switch off
        (conf_dir / "disable_ipv6").write_text("1\n")


@dataclass
class Sandbox:
    """A pod's network: its netns, the host end of its veth pair, its IP."""
    netns: str
    veth: str
    ip: str

    @property
    def etc(self) -> Path:
        return ETC_NETNS / self.netns


class PodNetwork:
    def __init__(self, *, bridge: str = "cdst0", cidr: str = "10.244.0.0/24",
                 service_ips: tuple[str, ...] = ("10.96.0.1",), service_cidr: str = "10.96.0.0/16",
                 on_change: Callable[[], None] = lambda: None):
        if len(bridge) > 15:
            raise ValueError(f"interface names have at most 15 characters: {bridge!r}")
        self.bridge = bridge
        self.net = ipaddress.ip_network(cidr)
        self.gateway = str(self.net.network_address + 1)
        self.service_ips = tuple(service_ips)
        self.service_cidr = service_cidr
        self.on_change = on_change  # the kubelet saves its state file
        self.made_bridge = False
        self.made_etc_netns = False
        self.sandboxes: dict[str, Sandbox] = {}
        self._next = 2
        self._lock = threading.Lock()

    # -- the host side --------------------------------------------------------------------

    def setup(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise NetError(f"interface {self.bridge} exists already (another kubelet? a crashed one: "
                           f"`python -m cluster.kubelet --dir DIR --kubelet-dir KUBELET_DIR --cleanup`, "
                           f"KUBELET_DIR being the folder with its state.json)")
        routes = json.loads(_ip("-j", "route", "show", "table", "all") or "[]")
        for r in routes:
            dst = r.get("dst", "")
            with contextlib.suppress(ValueError):
                if dst not in ("default", "") and ipaddress.ip_network(dst, strict=False).overlaps(self.net):
                    raise NetError(f"{self.net} overlaps the route {dst} dev {r.get('dev')}; pick another cidr")
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made_bridge = True
        self.on_change()
        _no_ipv6(Path(f"/proc/sys/net/ipv6/conf/{self.bridge}"))
        _ip("addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.bridge)
        for sip in self.service_ips:
            _ip("addr", "add", f"{sip}/32", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir(mode=0o755)
            self.made_etc_netns = True
            self.on_change()

    def teardown(self) -> None:
        errors = []
        for sb in list(self.sandboxes.values()):
            try:
                self.remove(sb)
            except NetError as e:
                errors.append(str(e))
        if self.made_bridge:
            with contextlib.suppress(NetError):
                _ip("link", "del", self.bridge)
            self.made_bridge = False
        if self.made_etc_netns:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only if empty: someone else's netns files stay
            self.made_etc_netns = False
        self.on_change()
        if errors:
            raise NetError("; ".join(errors))

    # -- per pod --------------------------------------------------------------------------

    def _allocate(self) -> str:
        used = {sb.ip for sb in self.sandboxes.values()}
        size = self.net.num_addresses - 3  # network, gateway, broadcast
        for i in range(size):
            # round robin, so a freed IP is not handed out again at once (a stale hosts entry
            # elsewhere would point at the wrong pod)
            n = 2 + (self._next - 2 + i) % size
            ip = str(self.net.network_address + n)
            if ip not in used:
                self._next = n + 1
                return ip
        raise NetError(f"no free address left in {self.net}")

    def add(self, netns: str, veth: str, files: Callable[[str], dict[str, str]]) -> Sandbox:
        """Create netns + veth + address; write /etc/netns/<netns>/<name> for each of files(ip)."""
        with self._lock:
            sb = Sandbox(netns, veth, self._allocate())
            self.sandboxes[netns] = sb
        self.on_change()
        try:
            sb.etc.mkdir(parents=True, exist_ok=True)
            for name, text in files(sb.ip).items():
                (sb.etc / name).write_text(text)
            _ip("netns", "add", netns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _no_ipv6(Path(f"/proc/sys/net/ipv6/conf/{veth}"))
            _ip("link", "set", veth, "master", self.bridge, "up")
            # IPv6 off before eth0 comes up (no link-local address, no router solicitations)
            subprocess.run([IP, "netns", "exec", netns, "/usr/sbin/sysctl", "-qw",
                            "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                            "net.ipv6.conf.eth0.disable_ipv6=1"], capture_output=True)
            _ip("-n", netns, "-batch", "-", stdin="\n".join([
                "link set lo up",
                f"addr add {sb.ip}/{self.net.prefixlen} dev eth0",
                "link set eth0 up",
                f"route add {self.service_cidr} via {self.gateway}",
            ]) + "\n")
        except BaseException:
            with contextlib.suppress(NetError):
                self.remove(sb)
            raise
        return sb

    def remove(self, sb: Sandbox) -> None:
        errors = []
        if Path(f"/sys/class/net/{sb.veth}").exists():
            try:
                _ip("link", "del", sb.veth)
            except NetError as e:
                errors.append(str(e))
        if (RUN_NETNS / sb.netns).exists():
            try:
                _ip("netns", "del", sb.netns)
            except NetError as e:
                errors.append(str(e))
        if sb.etc.exists():
            for f in sb.etc.iterdir():
                with contextlib.suppress(OSError):
                    f.unlink()
            with contextlib.suppress(OSError):
                sb.etc.rmdir()
        with self._lock:
            self.sandboxes.pop(sb.netns, None)
        self.on_change()
        if errors:
            raise NetError("; ".join(errors))

    @staticmethod
    def write_in_place(path: Path, text: str) -> bool:
        """Rewrite a file keeping its inode (see the module docstring); False if unchanged."""
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == text:
                return False
        with open(path, "w") as f:  # O_TRUNC: same inode, the bind mounts follow
            f.write(text)
        return True

    # -- crash recovery ---------------------------------------------------------------------

    def state(self) -> dict:
        return {"bridge": self.bridge if self.made_bridge else None, "etc_netns": self.made_etc_netns,
                "sandboxes": [asdict(sb) for sb in self.sandboxes.values()]}

    @staticmethod
    def cleanup(state: dict) -> list[str]:
        """Remove what a (dead) PodNetwork recorded; returns what was removed."""
        done = []
        net = PodNetwork(bridge=state.get("bridge") or "unused")
        for d in state.get("sandboxes", []):
            sb = Sandbox(**d)
            with contextlib.suppress(NetError):
                net.remove(sb)
                done.append(f"netns {sb.netns}, veth {sb.veth}")
        if state.get("bridge") and Path(f"/sys/class/net/{state['bridge']}").exists():
            with contextlib.suppress(NetError):
                _ip("link", "del", state["bridge"])
                done.append(f"bridge {state['bridge']}")
        if state.get("etc_netns"):
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()
        return done


class Forwarders:
    """TCP forwarders host-address:port -> 127.0.0.1:port, so that pods reach services that
    listen on loopback only (the apiserver). Plain byte pumps: TLS passes through untouched, so
    client certificates and bearer tokens work and the apiserver's certificate (SAN 10.96.0.1)
    is what the pod sees."""

    def __init__(self) -> None:
        self._listeners: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def add(self, listen_ip: str, listen_port: int, target_port: int, target_ip: str = "127.0.0.1") -> int:
        """Listen on listen_ip:listen_port (0: any free port); returns the port."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((listen_ip, listen_port))
        ls.listen(64)
        with self._lock:
            self._listeners.append(ls)
        threading.Thread(target=self._accept, args=(ls, (target_ip, target_port)), daemon=True,
                         name=f"forward-{listen_ip}:{ls.getsockname()[1]}").start()
        return ls.getsockname()[1]

    def _accept(self, ls: socket.socket, target: tuple[str, int]) -> None:
        while not self._closed:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            finished: list[socket.socket] = []
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, finished), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, finished: list[socket.socket]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            how = socket.SHUT_WR  # EOF: half-close, the other direction may still be talking
        except OSError:
            how = socket.SHUT_RDWR  # reset: end the other direction too
        with contextlib.suppress(OSError):
            dst.shutdown(how)
        with self._lock:
            finished.append(src)
            last = len(finished) == 2
            if last:
                self._conns.difference_update((src, dst))
        if last:
            src.close()
            dst.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks = [*self._listeners, *self._conns]
            self._listeners, self._conns = [], set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def netns_name(prefix: str, namespace: str, name: str, uid: str) -> str:
    """Readable in `ip netns list`, unique per pod incarnation (a recreated pod has a new uid)."""
    return f"{prefix}-{namespace}-{name}"[:80] + f"-{uid[:8]}"


def veth_name(uid: str) -> str:
    return "cdv" + hashlib.sha1(uid.encode()).hexdigest()[:10]  # 13 of the 15 characters allowed
