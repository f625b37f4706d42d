//! A FAKE Kubernetes API server, in memory, answering kube's mock service
//! (`tower_test::mock`) or real HTTP with a kubeconfig. It is not
//! Kubernetes: no API server can run on this machine, so this stands in for one,
//! with just what wiremesh's adapter uses, for Nodes, Leases, Peers, ConfigMaps,
//! Services, EndpointSlices and Vpcs alike:
//!
//! - GET of an object or a collection (with a `resourceVersion`), POST, PUT, DELETE;
//!   a namespaced resource's collection without a namespace (`/api/v1/services`)
//!   spans every namespace; `labelSelector` of `key` and `key=value` terms;
//! - PUT with `metadata.resourceVersion` only over that version (else 409
//!   Conflict), as optimistic concurrency on a real server; PUT to `<object>/status`
//!   replaces only `status` (a real server also ignores `status` in other writes to
//!   a resource with that subresource: not modelled);
//! - PATCH as a JSON merge patch (RFC 7396), and server-side apply approximated:
//!   create or merge into what is there, and remove the fields this field manager
//!   applied last time but leaves out now (lists count as one field). Real field
//!   ownership (conflicts between managers, fields another manager also set) is not
//!   modelled;
//! - WATCH from a resourceVersion: the events since then, then every new one, in
//!   order, on a stream that stays open (no bookmarks, no timeouts, no compaction).
//!
//! One counter orders every write, as etcd under a real API server does. There is
//! no admission, validation, RBAC, defaulting or garbage collection. What a test on
//! it proves is that wiremesh's adapter keeps its promises against an API server
//! that behaves like this; not that a real one does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};

pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type EventSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// The resources the fake serves: the last segment of a collection's path.
const RESOURCES: [(&str, &str, &str); 7] = [
    ("nodes", "v1", "Node"),
    ("configmaps", "v1", "ConfigMap"),
    ("services", "v1", "Service"),
    ("leases", "coordination.k8s.io/v1", "Lease"),
    ("endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
    ("peers", "wiremesh.io/v1alpha1", "Peer"),
    ("vpcs", "wiremesh.io/v1alpha1", "Vpc"),
];

/// The fake server's state; clients made by [`FakeApiServer::client`] share it.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    revision: u64,
    /// By collection path (`/api/v1/nodes`), then name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every write, for watches that start in the past.
    log: Vec<(u64, String, Value)>,
    /// By the collection asked for and its label selector.
    watchers: Vec<(String, Selector, EventSender)>,
    /// What each field manager last applied, by collection, name and manager.
    applied: BTreeMap<(String, String, String), Value>,
}

impl FakeApiServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers one request, whichever transport it came over (kube's mock
    /// service, or HTTP from [`FakeApiServer::serve_http`]).
    pub async fn respond<B: http_body::Body>(&self, request: Request<B>) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or(""),
                &content_type,
                body,
            )
    }

    /// Serves this fake over HTTP/1.1 on `listener` (bound in whichever network
    /// namespace the clients are reached from) from `runtime`, as long as it runs;
    /// returns a kubeconfig (YAML) that points at it, with `namespace` as its
    /// context's.
    pub fn serve_http(
        &self,
        runtime: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        namespace: &str,
    ) -> String {
        listener.set_nonblocking(true).expect("nonblocking");
        let address = listener.local_addr().expect("local address");
        let server = self.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                let service = hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.respond(request).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{address}\n\
             users:\n- name: fake\n  user: {{}}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n"
        )
    }

    /// The object `name` of `collection`, if there is one.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.objects.get(collection)?.get(name).cloned()
    }

    /// Creates or replaces an object as another component would (the kubelet making
    /// its Node, `kubectl apply`): `collection` is its path, e.g. `/api/v1/nodes`.
    pub fn put(&self, collection: &str, object: Value) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        state.write(collection, &name, object);
    }
}

fn kind_of(collection: &str) -> Option<(&'static str, &'static str)> {
    let resource = collection.rsplit('/').next()?;
    RESOURCES
        .iter()
        .find(|(r, _, _)| *r == resource)
        .map(|(_, version, kind)| (*version, *kind))
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("a valid response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<ResponseBody> {
    let body = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    json_response(code, &body)
}

/// RFC 7396: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Removes from `object` the fields `before` had and `now` has not.
fn remove_dropped(object: &mut Value, before: &Value, now: &Value) {
    let (Some(object), Some(before)) = (object.as_object_mut(), before.as_object()) else {
        return;
    };
    for (key, old) in before {
        match now.get(key) {
            None => {
                object.remove(key);
            }
            Some(new) => {
                if let Some(inner) = object.get_mut(key) {
                    remove_dropped(inner, old, new);
                }
            }
        }
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// `%XX` escapes decoded (selectors arrive as `wiremesh.io%2Fvpc%3Dblue`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A label selector of `key` (present) and `key=value` terms, all of which must hold.
#[derive(Clone, Default)]
struct Selector(Vec<(String, Option<String>)>);

impl Selector {
    fn parse(query: &str) -> Self {
        let Some(text) = query_param(query, "labelSelector") else {
            return Selector::default();
        };
        let text = percent_decode(text);
        Selector(
            text.split(',')
                .filter(|t| !t.is_empty())
                .map(|t| match t.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (t.to_owned(), None),
                })
                .collect(),
        )
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|(key, want)| match (&labels[key], want) {
            (Value::String(_), None) => true,
            (Value::String(have), Some(want)) => have == want,
            _ => false,
        })
    }
}

/// Whether a request for `asked` sees the objects of `stored`: the same collection,
/// or every namespace's of a namespaced resource (`/api/v1/services` sees
/// `/api/v1/namespaces/web/services`).
fn covers(asked: &str, stored: &str) -> bool {
    if asked == stored {
        return true;
    }
    let (Some((prefix, resource)), Some((ns_prefix, _))) =
        (asked.rsplit_once('/'), stored.split_once("/namespaces/"))
    else {
        return false;
    };
    prefix == ns_prefix && stored.ends_with(&format!("/{resource}"))
}

impl State {
    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: Value,
    ) -> Response<ResponseBody> {
        // `<object>/status` is the status subresource.
        let (path, status_only) = match path.strip_suffix("/status") {
            Some(object) if kind_of(object).is_none() => (object, true),
            _ => (path, false),
        };
        // `/api/v1/nodes` is a collection, `/api/v1/nodes/a1` an object in it.
        let (collection, name) = match kind_of(path) {
            Some(_) => (path.to_owned(), None),
            None => match path.rsplit_once('/') {
                Some((c, n)) if kind_of(c).is_some() => (c.to_owned(), Some(n.to_owned())),
                _ => {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("no resource at {path}"),
                    )
                }
            },
        };
        let existing = name
            .as_ref()
            .and_then(|n| self.objects.get(&collection)?.get(n).cloned());
        let not_found = || {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            )
        };
        match (method.as_str(), name) {
            ("GET", None) if query_param(query, "watch") == Some("true") => {
                let since: u64 = query_param(query, "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let selector = Selector::parse(query);
                let (tx, rx) = mpsc::unbounded();
                for (revision, c, event) in &self.log {
                    if *revision > since
                        && covers(&collection, c)
                        && selector.matches(&event["object"])
                    {
                        let _ = tx.unbounded_send(Ok(Frame::data(line(event))));
                    }
                }
                self.watchers.push((collection, selector, tx));
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(StreamBody::new(rx).boxed_unsync())
                    .expect("a valid response")
            }
            ("GET", None) => {
                let (version, kind) = kind_of(&collection).expect("a known collection");
                let selector = Selector::parse(query);
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(c, _)| covers(&collection, c))
                    .flat_map(|(_, o)| o.values())
                    .filter(|o| selector.matches(o))
                    .cloned()
                    .collect();
                let list = json!({"apiVersion": version, "kind": format!("{kind}List"),
                    "metadata": {"resourceVersion": self.revision.to_string()}, "items": items});
                json_response(StatusCode::OK, &list)
            }
            ("GET", Some(_)) => match existing {
                Some(object) => json_response(StatusCode::OK, &object),
                None => not_found(),
            },
            ("POST", None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_owned();
                if self
                    .objects
                    .get(&collection)
                    .is_some_and(|o| o.contains_key(&name))
                {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{name} exists"),
                    );
                }
                let object = self.write(&collection, &name, body);
                json_response(StatusCode::CREATED, &object)
            }
            ("PUT", Some(name)) => {
                let expected = body["metadata"]["resourceVersion"].as_str();
                let current = existing
                    .as_ref()
                    .and_then(|o| o["metadata"]["resourceVersion"].as_str());
                if expected.is_some() && expected != current {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("{path}: the object has been modified; apply your changes to the latest version and try again"),
                    );
                }
                let object = match (status_only, existing) {
                    (true, Some(mut object)) => {
                        object["status"] = body["status"].clone();
                        object
                    }
                    (true, None) => return not_found(),
                    (false, _) => body,
                };
                let object = self.write(&collection, &name, object);
                json_response(StatusCode::OK, &object)
            }
            ("PATCH", Some(name)) => {
                let mut object = match (existing, content_type) {
                    (Some(object), _) => object,
                    // Server-side apply creates what is not there.
                    (None, "application/apply-patch+yaml") => {
                        json!({"metadata": {"name": name}})
                    }
                    (None, _) => return not_found(),
                };
                match content_type {
                    "application/merge-patch+json" => merge(&mut object, &body),
                    "application/apply-patch+yaml" => {
                        let manager = query_param(query, "fieldManager").unwrap_or("").to_owned();
                        let key = (collection.clone(), name.clone(), manager);
                        if let Some(before) = self.applied.get(&key) {
                            remove_dropped(&mut object, before, &body);
                        }
                        merge(&mut object, &body);
                        self.applied.insert(key, body);
                    }
                    other => {
                        return status(
                            StatusCode::UNSUPPORTED_MEDIA_TYPE,
                            "UnsupportedMediaType",
                            format!("the fake does not do {other} patches"),
                        )
                    }
                }
                let object = self.write(&collection, &name, object);
                json_response(StatusCode::OK, &object)
            }
            ("DELETE", Some(name)) => match existing {
                Some(mut object) => {
                    self.objects.get_mut(&collection).map(|o| o.remove(&name));
                    self.applied
                        .retain(|(c, n, _), _| !(*c == collection && *n == name));
                    self.revision += 1;
                    object["metadata"]["resourceVersion"] = self.revision.to_string().into();
                    self.publish(&collection, json!({"type": "DELETED", "object": object}));
                    json_response(StatusCode::OK, &object)
                }
                None => not_found(),
            },
            (method, _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("the fake does not do {method} {path}"),
            ),
        }
    }

    /// Stores `object` under a new revision and tells the watchers.
    fn write(&mut self, collection: &str, name: &str, mut object: Value) -> Value {
        let (version, kind) = kind_of(collection).expect("a known collection");
        self.revision += 1;
        object["apiVersion"] = version.into();
        object["kind"] = kind.into();
        object["metadata"]["name"] = name.into();
        object["metadata"]["resourceVersion"] = self.revision.to_string().into();
        if let Some((_, namespace)) = collection.split_once("/namespaces/") {
            let namespace = namespace.split('/').next().unwrap_or_default();
            object["metadata"]["namespace"] = namespace.into();
        }
        let objects = self.objects.entry(collection.to_owned()).or_default();
        let kind = if objects.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        objects.insert(name.to_owned(), object.clone());
        self.publish(collection, json!({"type": kind, "object": object}));
        object
    }

    fn publish(&mut self, collection: &str, event: Value) {
        self.watchers.retain(|(c, selector, tx)| {
            !covers(c, collection)
                || !selector.matches(&event["object"])
                || tx.unbounded_send(Ok(Frame::data(line(&event)))).is_ok()
        });
        self.log.push((self.revision, collection.to_owned(), event));
    }
}

fn line(event: &Value) -> Bytes {
    Bytes::from(format!("{event}\n"))
}
