"""A fake Kubernetes API server (aiohttp) that answers like the recorded kube-apiserver.

Built from ../shared/reference/kube-api/ (checked against it in test_kube_fake.py):
`Status` bodies with the same messages and reasons, 409 Conflict on a stale
resourceVersion and AlreadyExists on a second create, 401 for a bad token, 403 for no
token (system:anonymous) and for a verb our ServiceAccount lacks, lists as `NodeList`
with a chunked body, watches as chunked NDJSON (replay from a resourceVersion, ERROR 410
inside a 200 stream when it fell out of the watch cache, BOOKMARKs about 2 s before
timeoutSeconds, a clean end at timeoutSeconds), one resourceVersion counter for all kinds.

It runs on its own thread and loop, so synchronous tests and daemon processes can use
it; `down()` closes the port and every open stream (an outage), `up()` reopens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

SA_USER = "system:serviceaccount:kube-system:weave-ipam"


def recordings() -> Path:
    """../shared/reference/kube-api beside the clone (or beside the worktrees' parent)."""
    here = Path(__file__).resolve().parent.parent
    for base in (here.parent, here.parent.parent):
        d = base / "shared" / "reference" / "kube-api"
        if d.is_dir():
            return d
    raise AssertionError(f"the recorded API exchanges are missing: expected shared/reference/"
                         f"kube-api beside {here}")
WATCH_CACHE = 100  # node events kept for watches, as the recorded server
WATCH_DEFAULT_TIMEOUT = 1800
BOOKMARK_BEFORE = 2.0


def status_body(code: int, reason: str, message: str,
                details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": message, "reason": reason}
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _headers() -> dict[str, str]:
    return {"Audit-Id": str(uuid.uuid4()), "Cache-Control": "no-cache, private"}


def _json(body: dict[str, Any], status: int = 200, chunked: bool = False) -> web.Response:
    data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    # exactly "application/json", no charset, as the real server
    r = web.Response(status=status, body=data,
                     headers={**_headers(), "Content-Type": "application/json"})
    if chunked:
        r.enable_chunked_encoding()
    return r


def _status(code: int, reason: str, message: str,
            details: dict[str, Any] | None = None) -> web.Response:
    return _json(status_body(code, reason, message, details), code)


class FakeKube:
    def __init__(self, host: str = "127.0.0.1", namespace: str = "kube-system",
                 token: str = "weave-ipam-token",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context  # HTTPS, as a real API server
        self.port = 0
        self.namespace = namespace
        self.token = token
        self.rv = 200
        self.start_rv = self.rv  # nothing older is known: a watch from before is expired
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) our SA lacks
        # RBAC rules bound to our SA: (namespace or None for a ClusterRole, rule); None: all
        self.rbac: list[tuple[str | None, dict[str, Any]]] | None = None
        self.requests: list[list[Any]] = []  # [method, path_qs, status] in arrival order
        self._lock = threading.RLock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="kubefake")
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._changed: asyncio.Event | None = None  # replaced by a new one at each change
        self._streams: set[web.StreamResponse] = set()

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> FakeKube:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop_runner())
        with contextlib.suppress(Exception):
            self._call(self._cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def down(self) -> None:
        """An outage: the port is closed and every open connection dropped."""
        self._call(self._down())

    def up(self) -> None:
        self._call(self._up())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._up()

    async def _up(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True,
                                 ssl_context=self.ssl_context)
        await self._site.start()
        if not self.port:
            server = self._site._server
            assert isinstance(server, asyncio.base_events.Server)
            self.port = server.sockets[0].getsockname()[1]

    async def _down(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for s in list(self._streams):
            tr = s._req.transport if s._req is not None else None  # noqa: SLF001
            if tr is not None:
                tr.abort()
        # keep-alive connections too: a real outage drops them
        assert self._runner is not None
        server = self._runner.server
        if server is not None:
            for proto in list(server.connections):
                if proto.transport is not None:
                    proto.transport.abort()

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_runner(self) -> None:
        await self._down()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def kubeconfig(self, path: Path, token: str | None = None,
                   namespace: str | None = None) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "weave-ipam", "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": {
                "cluster": "fake", "user": "weave-ipam",
                "namespace": namespace or self.namespace}}]}))
        return path

    # ---- state changes (from tests, thread-safe) --------------------------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((int(obj["metadata"]["resourceVersion"]), kind, obj))
        del self.events[:-WATCH_CACHE]
        if self._changed is not None:
            asyncio.run_coroutine_threadsafe(self._notify(), self._loop)

    async def _notify(self) -> None:
        assert self._changed is not None
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def node_object(self, name: str, address: str, pod_cidrs: list[str] | None = None,
                    labels: dict[str, str] | None = None,
                    annotations: dict[str, str] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if pod_cidrs:
            spec = {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}
        meta: dict[str, Any] = {"name": name, "labels": labels or {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}
        if annotations:
            meta["annotations"] = annotations
        return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec,
                "status": {"addresses": [{"type": "InternalIP", "address": address},
                                         {"type": "Hostname", "address": name}]}}

    def add_node(self, name: str, address: str, pod_cidrs: list[str] | None = None,
                 annotations: dict[str, str] | None = None) -> str:
        with self._lock:
            ok, body = self._create_node(self.node_object(name, address, pod_cidrs,
                                                          annotations=annotations))
            assert ok == 201, body
            return str(body["metadata"]["uid"])

    def patch_node(self, name: str, patch: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A merge patch, as `kubectl patch node --type merge` (e.g. an annotation)."""
        with self._lock:
            return self._patch_node(name, patch)

    def delete_node(self, name: str) -> None:
        with self._lock:
            assert self._delete_node(name)[0] == 200

    def configmap(self, name: str = "weave-ipam-peers") -> dict[str, Any] | None:
        with self._lock:
            cm = self.configmaps.get((self.namespace, name))
            return json.loads(json.dumps(cm)) if cm is not None else None

    def _create_node(self, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = obj.get("metadata", {}).get("name", "")
        if name in self.nodes:
            return 409, status_body(409, "AlreadyExists", f'nodes "{name}" already exists',
                                    {"name": name, "kind": "nodes"})
        n = json.loads(json.dumps(obj))
        n["kind"], n["apiVersion"] = "Node", "v1"
        meta = n.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._bump(),
                    creationTimestamp="2026-12-01T14:12:51Z")
        spec = n.setdefault("spec", {})
        spec["taints"] = [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
        self.nodes[name] = n
        self._event("ADDED", n)
        return 201, n

    def _patch_node(self, name: str, patch: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """RFC 7386 merge patch (strategic merge patch is the same for what we patch): a
        change is a MODIFIED event with a new resourceVersion, a no-op is neither; podCIDRs
        may only go from none to set (422, as recorded)."""
        cur = self.nodes.get(name)
        if cur is None:
            return 404, status_body(404, "NotFound", f'nodes "{name}" not found',
                                    {"name": name, "kind": "nodes"})
        new = _merge(json.loads(json.dumps(cur)), patch)
        old_spec, new_spec = cur.get("spec") or {}, new.get("spec") or {}
        if old_spec.get("podCIDRs") and (new_spec.get("podCIDRs") != old_spec["podCIDRs"]
                                         or new_spec.get("podCIDR") != old_spec["podCIDR"]):
            msg = 'Forbidden: node updates may not change podCIDR except from "" to valid'
            cause = {"reason": "FieldValueForbidden", "message": msg, "field": "spec.podCIDRs"}
            return 422, status_body(422, "Invalid", f'Node "{name}" is invalid: '
                                    f"spec.podCIDRs: {msg}",
                                    {"name": name, "kind": "Node", "causes": [cause, cause]})
        if new_spec.get("podCIDRs"):
            new_spec["podCIDR"] = new_spec["podCIDRs"][0]
        if new == cur:
            return 200, cur
        new["metadata"]["resourceVersion"] = self._bump()
        self.nodes[name] = new
        self._event("MODIFIED", new)
        return 200, new

    def _delete_node(self, name: str) -> tuple[int, dict[str, Any]]:
        n = self.nodes.pop(name, None)
        if n is None:
            return 404, status_body(404, "NotFound", f'nodes "{name}" not found',
                                    {"name": name, "kind": "nodes"})
        n = json.loads(json.dumps(n))
        n["metadata"]["resourceVersion"] = self._bump()
        self._event("DELETED", n)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                     "status": "Success", "details": {"name": name, "kind": "nodes",
                                                      "uid": n["metadata"]["uid"]}}

    # ---- HTTP -------------------------------------------------------------------------

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        entry: list[Any] = [req.method, req.path_qs, 0]  # status 0 while it streams
        self.requests.append(entry)
        resp = await self._route(req)
        entry[2] = resp.status
        return resp

    def _auth(self, req: web.Request, verb: str, resource: str, name: str | None,
              namespace: str | None) -> web.Response | None:
        auth = req.headers.get("Authorization", "")
        if not auth:
            user = "system:anonymous"
        elif auth != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        else:
            user = SA_USER
            if (verb, resource) not in self.forbidden and self._allowed(
                    verb, resource, name, namespace):
                return None
        what = f'{resource} "{name}"' if name else resource
        where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        details: dict[str, Any] = {"name": name, "kind": resource} if name else \
            {"kind": resource}
        return _status(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {verb} '
                       f'resource "{resource}" in API group ""{where}', details)

    def use_rbac(self, docs: list[dict[str, Any]], sa: str = "weave-ipam") -> None:
        """Authorize our ServiceAccount by the Roles and ClusterRoles bound to it in these
        manifest documents, as the real RBAC authorizer does."""
        roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
                 for d in docs if d["kind"] in ("Role", "ClusterRole")}
        self.rbac = []
        for b in docs:
            if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
                       for s in b["subjects"]):
                continue
            ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
            ref = b["roleRef"]
            role = roles.get((ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"]))
            for rule in (role or {}).get("rules", []):
                self.rbac.append((ns, rule))

    def _allowed(self, verb: str, resource: str, name: str | None,
                 namespace: str | None) -> bool:
        if self.rbac is None:
            return True
        for ns, r in self.rbac:
            if ns is not None and ns != namespace:
                continue
            if "" not in r.get("apiGroups", []) or resource not in r.get("resources", []):
                continue
            if verb not in r.get("verbs", []) and "*" not in r.get("verbs", []):
                continue
            names = r.get("resourceNames")
            if names and (name is None or name not in names):
                continue  # so never a create or a plain list
            return True
        return False

    async def _route(self, req: web.Request) -> web.StreamResponse:
        parts = [p for p in req.path.split("/") if p]
        m = req.method
        if parts[:2] != ["api", "v1"]:
            return _status(404, "NotFound", "the server could not find the requested resource",
                           {})
        rest = parts[2:]
        if rest and rest[0] == "nodes":
            name = rest[1] if len(rest) > 1 else None
            watch = req.query.get("watch") in ("1", "true")
            verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                    "DELETE": "delete", "PUT": "update", "PATCH": "patch"}.get(m, m.lower())
            denied = self._auth(req, verb, "nodes", name, None)
            if denied is not None:
                return denied
            return await self._nodes(req, verb, name)
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == "configmaps":
            ns, name = rest[1], (rest[3] if len(rest) > 3 else None)
            verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update",
                    "DELETE": "delete", "PATCH": "patch"}.get(m, m.lower())
            denied = self._auth(req, verb, "configmaps", name, ns)
            if denied is not None:
                return denied
            return await self._configmaps(req, verb, ns, name)
        return _status(404, "NotFound", "the server could not find the requested resource", {})

    async def _body(self, req: web.Request, kind: str) -> dict[str, Any] | web.Response:
        try:
            obj = json.loads(await req.read())
        except ValueError as e:
            return _status(400, "BadRequest", f"{kind} in version \"v1\" cannot be handled "
                           f"as a {kind}: {e}")
        if not isinstance(obj, dict):
            return _status(400, "BadRequest", f"{kind} in version \"v1\" cannot be handled "
                           f"as a {kind}")
        return obj

    async def _nodes(self, req: web.Request, verb: str, name: str | None) -> web.StreamResponse:
        if verb == "watch":
            return await self._watch(req)
        with self._lock:
            if verb == "list":
                items = []
                for n in self.nodes.values():
                    item = dict(n)
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                    items.append(item)
                return _json({"kind": "NodeList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": str(self.rv)}, "items": items},
                             chunked=True)
            if verb == "get":
                assert name is not None
                if name not in self.nodes:
                    return _status(404, "NotFound", f'nodes "{name}" not found',
                                   {"name": name, "kind": "nodes"})
                return _json(self.nodes[name])
            if verb == "delete":
                assert name is not None
                code, body = self._delete_node(name)
                return _json(body, code)
        if verb == "create":
            obj = await self._body(req, "Node")
            if isinstance(obj, web.Response):
                return obj
            with self._lock:
                code, body = self._create_node(obj)
            return _json(body, code)
        if verb == "patch" and name is not None:
            if req.content_type not in ("application/merge-patch+json",
                                        "application/strategic-merge-patch+json"):
                return _status(415, "UnsupportedMediaType", "415: Unsupported Media Type", {})
            obj = await self._body(req, "Node")
            if isinstance(obj, web.Response):
                return obj
            with self._lock:
                code, body = self._patch_node(name, obj)
            return _json(body, code)
        return _status(405, "MethodNotAllowed", "the server does not allow this method on "
                       "the requested resource", {})

    async def _watch(self, req: web.Request) -> web.StreamResponse:
        q = req.query
        timeout = float(q.get("timeoutSeconds", WATCH_DEFAULT_TIMEOUT))
        bookmarks = q.get("allowWatchBookmarks") == "true"
        rv_text = q.get("resourceVersion")
        resp = web.StreamResponse(status=200, headers={**_headers(),
                                                       "Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        self._streams.add(resp)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            with self._lock:
                if not rv_text or rv_text == "0":
                    pos = self.rv  # ADDED for every node first
                    lines = [{"type": "ADDED", "object": n} for n in self.nodes.values()]
                else:
                    pos = int(rv_text)  # the server compares them; clients must not
                    oldest = self.events[0][0] if self.events else self.rv + 1
                    if pos < self.start_rv or (len(self.events) >= WATCH_CACHE
                                               and pos < oldest - 1):
                        err = status_body(410, "Expired", f"too old resource version: {pos} "
                                          f"({oldest - 1})")
                        err.pop("details", None)
                        await resp.write(json.dumps({"type": "ERROR", "object": err},
                                                    separators=(",", ":")).encode() + b"\n")
                        await resp.write_eof()
                        return resp
                    lines = [{"type": k, "object": o} for r, k, o in self.events if r > pos]
                    if self.events:
                        pos = max(pos, self.events[-1][0])
            sent_bookmark = False
            while True:
                for ev in lines:
                    await resp.write(json.dumps(ev, separators=(",", ":")).encode() + b"\n")
                left = end - loop.time()
                if left <= 0:
                    break
                if bookmarks and not sent_bookmark and left <= BOOKMARK_BEFORE \
                        and self.rv > int(rv_text or 0):
                    sent_bookmark = True
                    bm = {"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                         "metadata": {"resourceVersion":
                                                                      str(self.rv)}}}
                    lines = [bm]
                    continue
                assert self._changed is not None
                wait = left - BOOKMARK_BEFORE if bookmarks and not sent_bookmark \
                    and left > BOOKMARK_BEFORE else left
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)
                with self._lock:
                    lines = [{"type": k, "object": o} for r, k, o in self.events if r > pos]
                    if self.events:
                        pos = max(pos, self.events[-1][0])
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(resp)
        return resp

    async def _configmaps(self, req: web.Request, verb: str, ns: str,
                          name: str | None) -> web.StreamResponse:
        if verb == "get" and name is not None:
            with self._lock:
                cm = self.configmaps.get((ns, name))
                if cm is None:
                    return _status(404, "NotFound", f'configmaps "{name}" not found',
                                   {"name": name, "kind": "configmaps"})
                return _json(cm)
        if verb == "delete" and name is not None:
            with self._lock:
                cm = self.configmaps.pop((ns, name), None)
                if cm is None:
                    return _status(404, "NotFound", f'configmaps "{name}" not found',
                                   {"name": name, "kind": "configmaps"})
                self._bump()
                return _json({"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Success", "details": {
                                  "name": name, "kind": "configmaps",
                                  "uid": cm["metadata"]["uid"]}})
        if verb not in ("create", "update"):
            return _status(405, "MethodNotAllowed", "the server does not allow this method "
                           "on the requested resource", {})
        obj = await self._body(req, "ConfigMap")
        if isinstance(obj, web.Response):
            return obj
        meta = obj.get("metadata") or {}
        data = obj.get("data") or {}
        if not all(isinstance(v, str) for v in data.values()):
            return _status(400, "BadRequest", 'ConfigMap in version "v1" cannot be handled as '
                           "a ConfigMap: json: cannot unmarshal number into Go struct field "
                           "ConfigMap.data of type string")
        oname = meta.get("name", "")
        with self._lock:
            if verb == "create":
                if (ns, oname) in self.configmaps:
                    return _status(409, "AlreadyExists", f'configmaps "{oname}" already exists',
                                   {"name": oname, "kind": "configmaps"})
                cm = {"kind": "ConfigMap", "apiVersion": "v1",
                      "metadata": {**meta, "name": oname, "namespace": ns,
                                   "uid": str(uuid.uuid4()), "resourceVersion": self._bump(),
                                   "creationTimestamp": "2026-12-01T14:16:01Z"},
                      "data": data}
                cm["metadata"].pop("managedFields", None)
                self.configmaps[(ns, oname)] = cm
                return _json(cm, 201)
            assert name is not None
            if oname != name:
                return _status(400, "BadRequest", f"the name of the object ({oname}) does not "
                               f"match the name on the URL ({name})")
            cur = self.configmaps.get((ns, name))
            if cur is None:
                return _status(404, "NotFound", f'configmaps "{name}" not found',
                               {"name": name, "kind": "configmaps"})
            want = meta.get("resourceVersion")
            if want and want != cur["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", "Operation cannot be fulfilled on configmaps "
                               f'"{name}": the object has been modified; please apply your '
                               "changes to the latest version and try again",
                               {"name": name, "kind": "configmaps"})
            if data != cur.get("data", {}):
                cur["metadata"]["resourceVersion"] = self._bump()
            cur["data"] = data
            return _json(cur)


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


@contextlib.contextmanager
def running(**kw: Any) -> Iterator[FakeKube]:
    """A started fake API server, closed afterwards whatever happened."""
    f = FakeKube(**kw).start()
    try:
        yield f
    finally:
        f.close()
