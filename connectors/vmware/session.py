"""A vSphere API session (pyvmomi): connect with the operator's TLS choice, find VMs,
wait for tasks, and the pieces the datastore file endpoint needs (cookie, paths).

Platform config (non-secret): ``host``, ``port`` (443), and one of ``thumbprint``
(SHA-1/SHA-256 of the server certificate, as vCenter shows it), ``ca_file`` (PEM
bundle that signed it) or ``insecure: true`` (no verification at all; only when the
operator asks for it explicitly). Secret: ``user`` and ``password``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import ssl
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl
from pyVmomi.Security import ThumbprintMismatchException

from connectors.base import ConnectorError, NotFound, PermanentError
from transcend.models import PlatformInfo

log = logging.getLogger(__name__)

TASK_POLL = 0.2


@dataclass(frozen=True)
class TlsChoice:
    """How the server's certificate is checked, for both pyvmomi and nbdkit-curl."""

    thumbprint: str = ""
    ca_file: str = ""
    insecure: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], platform: str) -> TlsChoice:
        thumbprint = str(config.get("thumbprint", "")).strip()
        ca_file = str(config.get("ca_file", "")).strip()
        raw = config.get("insecure", False)  # from the CLI, --config insecure=true is a string
        insecure = raw is True or str(raw).strip().lower() in ("true", "yes", "1")
        if sum(bool(x) for x in (thumbprint, ca_file, insecure)) != 1:
            raise PermanentError(
                f"platform {platform!r}: say how to trust the vSphere certificate with exactly "
                "one of config thumbprint (as shown by vCenter, e.g. `openssl s_client -connect "
                "HOST:443 </dev/null | openssl x509 -noout -fingerprint -sha1`), ca_file (PEM) "
                "or insecure: true (no verification; for labs only)")
        return cls(thumbprint=thumbprint, ca_file=ca_file, insecure=insecure)


def normalize_thumbprint(text: str) -> str:
    return re.sub(r"[^0-9a-f]", "", text.lower())


def server_certificate(host: str, port: int, timeout: float = 10.0) -> bytes:
    """The DER certificate the server presents (no verification: the caller pins it)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ConnectorError(f"{host}:{port} presented no TLS certificate")
    return der


def check_thumbprint(der: bytes, expected: str, where: str) -> None:
    want = normalize_thumbprint(expected)
    algo = {40: "sha1", 64: "sha256", 128: "sha512"}.get(len(want))
    if algo is None:
        raise PermanentError(f"thumbprint {expected!r} is not a SHA-1, SHA-256 or SHA-512 "
                             "fingerprint (hex, colons allowed)")
    got = hashlib.new(algo, der).hexdigest()
    if got != want:
        raise PermanentError(
            f"the TLS certificate of {where} does not match the configured thumbprint "
            f"({algo} {_colons(got)}, expected {_colons(want)}): a different server, or its "
            "certificate was replaced; check it and update the platform's thumbprint")


def _colons(hexstr: str) -> str:
    return ":".join(hexstr[i:i + 2] for i in range(0, len(hexstr), 2)).upper()


class VsphereSession:
    """One logged-in session; ``close()`` logs out (also when garbage-collected, so an
    activity that forgets does not leak vCenter sessions, which are limited)."""

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.platform = info.name
        self.host = str(info.config.get("host", "")).strip()
        if not self.host:
            raise PermanentError(f"platform {info.name!r}: config host (vCenter or ESXi) is missing")
        self.port = int(info.config.get("port", 443))
        self.tls = TlsChoice.from_config(info.config, info.name)
        self.user = secret.get("user", "")
        password = secret.get("password", "")
        # A session another tool logged in (its vmware_soap_session cookie value): used
        # as is, never logged out by us, and the user is only needed for VDDK.
        borrowed = secret.get("session", "").strip().strip('"')
        if not self.user and not borrowed:
            raise PermanentError(f"platform {info.name!r}: secret user (and password) or "
                                 "session is missing")
        kwargs: dict[str, Any] = {}
        if self.tls.insecure:
            kwargs["disableSslCertValidation"] = True
        elif self.tls.thumbprint:
            # pyvmomi checks a thumbprint only when normal verification *fails*, and its
            # version probe does not check it at all; so the certificate the server
            # presents is checked here, then pyvmomi connects without verification.
            check_thumbprint(server_certificate(self.host, self.port), self.tls.thumbprint,
                             f"vSphere {self.host}:{self.port}")
            kwargs["disableSslCertValidation"] = True
        else:
            kwargs["sslContext"] = ssl.create_default_context(cafile=self.tls.ca_file)
        where = f"vSphere {self.host}:{self.port}"
        try:
            if borrowed:
                kwargs["sessionId"] = borrowed
            self.si = SmartConnect(host=self.host, port=self.port, user=self.user, pwd=password,
                                   httpConnectionTimeout=60, **kwargs)
        except vim.fault.InvalidLogin as e:
            raise PermanentError(
                f"{where} refused the login of {self.user!r}: {_fault_text(e)}; check the platform's "
                "user and password (`transcend platform add … --secret user=… --secret "
                "password=…`)") from e
        except ssl.SSLError as e:
            raise PermanentError(f"TLS to {where} failed: {e}; check ca_file / thumbprint") from e
        except (vim.fault.SSLVerifyFault, ThumbprintMismatchException) as e:
            raise PermanentError(f"{where}: the certificate does not match the configured "
                                 f"thumbprint ({e}); a different server, or its certificate was "
                                 "replaced: check it and update the platform's thumbprint") from e
        except (OSError, vmodl.MethodFault) as e:
            raise ConnectorError(f"cannot reach {where}: {_fault_text(e)}") from e
        self.content = self.si.RetrieveContent()
        if borrowed:
            try:
                current = self.content.sessionManager.currentSession
            except vim.fault.NotAuthenticated:
                current = None
            if current is None:
                raise PermanentError(f"{where}: the session given in the platform's secret "
                                     "is not logged in (expired or logged out); give a fresh "
                                     "one or a user and password")
            self.user = self.user or str(current.userName)
        self._finalizer = weakref.finalize(self, _logout if not borrowed else _keep, self.si)

    def describe(self) -> str:
        """What this session reached, for ``transcend platform check``."""
        about = self.content.about
        return (f"vSphere {self.host}:{self.port}: {about.fullName} ({about.apiType}), "
                f"logged in as {self.user or 'a borrowed session'}")

    def close(self) -> None:
        self._finalizer()

    # ------------------------------------------------------------------ lookups

    def all_vms(self) -> list[vim.VirtualMachine]:
        view = self.content.viewManager.CreateContainerView(
            self.content.rootFolder, [vim.VirtualMachine], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def find_vm(self, ref_or_name: str) -> vim.VirtualMachine:
        """By instance UUID (what transcend stores), managed object id (vm-123) or name."""
        index = self.content.searchIndex
        with contextlib.suppress(vmodl.MethodFault):
            vm = index.FindByUuid(None, ref_or_name, True, True)
            if vm is not None:
                return vm
        vms = self.all_vms()
        for vm in vms:
            if vm._moId == ref_or_name:
                return vm
        named = [vm for vm in vms if vm.name == ref_or_name]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise PermanentError(
                f"{len(named)} VMs are named {ref_or_name!r} on {self.platform!r}; give the "
                "instance UUID instead (`transcend workloads " + self.platform + "`)")
        known = ", ".join(sorted(vm.name for vm in vms)[:20]) or "none"
        raise NotFound(f"no VM {ref_or_name!r} on platform {self.platform!r} "
                       f"({self.host}); known VMs: {known}")

    def datacenter_of(self, obj: Any) -> vim.Datacenter:
        node = obj
        while node is not None and not isinstance(node, vim.Datacenter):
            node = node.parent
        if node is None:
            raise ConnectorError(f"{obj} is not inside a datacenter")
        return node

    # ------------------------------------------------------------------ tasks

    def wait(self, task: vim.Task, what: str, timeout: float = 1800) -> Any:
        """The task's result; its fault as a ConnectorError naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            state = task.info.state
            if state == vim.TaskInfo.State.success:
                return task.info.result
            if state == vim.TaskInfo.State.error:
                fault = task.info.error
                raise task_error(what, fault)
            if time.monotonic() > deadline:
                raise ConnectorError(f"{what}: the vSphere task {task._moId} did not finish in "
                                     f"{timeout:.0f}s; see Recent Tasks in the vSphere client")
            time.sleep(TASK_POLL)

    # ------------------------------------------------------------------ files

    def session_cookie(self) -> str:
        """``vmware_soap_session=…``: what the datastore file endpoint wants."""
        raw = str(self.si._stub.cookie or "")
        m = re.search(r"(vmware_soap_session)=(\"?[^;\"]+\"?)", raw)
        if not m:
            raise ConnectorError(f"no vSphere session cookie from {self.host}; cannot read "
                                 "datastore files")
        return f"{m.group(1)}={m.group(2)}"

    def file_url(self, datastore_path: str, datacenter: str) -> str:
        """HTTPS URL of a datastore file (``[ds] dir/file``) on the /folder endpoint."""
        ds, path = split_datastore_path(datastore_path)
        return (f"https://{self.host}:{self.port}/folder/{quote(path)}"
                f"?dcPath={quote(datacenter)}&dsName={quote(ds)}")

    def read_file(self, datastore_path: str, datacenter: str, limit: int = 1 << 20) -> bytes:
        """A small datastore file (a .vmdk descriptor) through the same endpoint."""
        import requests
        from urllib3.exceptions import InsecureRequestWarning

        verify: bool | str = False if (self.tls.insecure or self.tls.thumbprint) else self.tls.ca_file
        if self.tls.thumbprint:
            check_thumbprint(server_certificate(self.host, self.port), self.tls.thumbprint,
                             f"{self.host}:{self.port}")
        url = self.file_url(datastore_path, datacenter)
        try:
            with warnings.catch_warnings():
                # Unverified only after the thumbprint check above, or when asked for.
                warnings.simplefilter("ignore", InsecureRequestWarning)
                r = requests.get(url, headers={"Cookie": self.session_cookie()}, verify=verify,
                                 timeout=60, stream=True)
        except requests.RequestException as e:
            raise ConnectorError(f"reading {datastore_path} from {self.host} failed: {e}") from e
        with r:
            if r.status_code == 404:
                raise NotFound(f"{datastore_path} does not exist on datastore ({self.host})")
            if r.status_code != 200:
                raise ConnectorError(f"reading {datastore_path} from {self.host}: HTTP "
                                     f"{r.status_code} {r.reason}")
            data = r.raw.read(limit + 1)
        if len(data) > limit:
            raise ConnectorError(f"{datastore_path} is larger than {limit} bytes; not a descriptor")
        return bytes(data)


def split_datastore_path(path: str) -> tuple[str, str]:
    """``"[ds1] vm/disk.vmdk"`` -> ``("ds1", "vm/disk.vmdk")``."""
    m = re.fullmatch(r"\[([^\]]+)\]\s*(.*)", path.strip())
    if not m:
        raise ConnectorError(f"{path!r} is not a datastore path like '[datastore] dir/file'")
    return m.group(1), m.group(2)


def _keep(si: Any) -> None:
    """A borrowed session belongs to whoever logged it in: not ours to end."""


def _logout(si: Any) -> None:
    with contextlib.suppress(Exception):
        Disconnect(si)


def _fault_text(e: BaseException) -> str:
    msg = getattr(e, "msg", "") or getattr(e, "localizedMessage", "") or str(e)
    name = type(e).__name__.rpartition(".")[2]  # vim.fault.NoDiskSpace -> NoDiskSpace
    return f"{name}: {msg}" if msg else name


def task_error(what: str, fault: Any) -> ConnectorError:
    """A task fault as an error that names it and says what to do for the usual ones."""
    text = _fault_text(fault) if fault is not None else "unknown error"
    if isinstance(fault, (vim.fault.NoDiskSpace, vim.fault.FileNotWritable)) or \
            type(fault).__name__.endswith("InsufficientDiskSpace"):
        return PermanentError(f"{what} failed: the datastore is full or read-only ({text}); "
                              "free space on it or choose another datastore")
    if isinstance(fault, vim.fault.NoPermission):
        return PermanentError(f"{what} failed: permission denied ({text}); give the user the "
                              "privileges listed in docs/platforms/vmware.md")
    if isinstance(fault, (vim.fault.InvalidState, vim.fault.TaskInProgress)):
        return ConnectorError(f"{what} failed: the VM is busy ({text}); retried")
    return ConnectorError(f"{what} failed: {text}")


@contextlib.contextmanager
def session(info: PlatformInfo, secret: dict[str, str]) -> Iterator[VsphereSession]:
    s = VsphereSession(info, secret)
    try:
        yield s
    finally:
        s.close()
