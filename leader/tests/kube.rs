//! The Kubernetes source against an API server that serves recorded
//! list/watch responses over real HTTP: the bookstore as a cluster would list
//! it, a watch that expires (410 Gone) so the watcher re-lists, a DELETED
//! event, and a custom resource that does not fit its schema.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    collections::HashMap,
    convert::Infallible,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use kube::api::ApiResource;
use tokio::{net::TcpListener, sync::mpsc};
use trellis_leader::{
    ca::BuiltinCa,
    compile::Compiler,
    kinds::Object,
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{files::FileSource, kube::KubeSource, Source},
};
use trellis_shared::{type_url, Scope};

fn path_of(resource: &ApiResource) -> String {
    if resource.group.is_empty() {
        format!("/api/{}/{}", resource.version, resource.plural)
    } else {
        format!(
            "/apis/{}/{}/{}",
            resource.group, resource.version, resource.plural
        )
    }
}

/// What the fake API server answers, per resource path.
#[derive(Default)]
struct Recorded {
    lists: HashMap<String, Vec<serde_json::Value>>,
    /// Watch responses, served once each in order; then watches stay open.
    watches: HashMap<String, Vec<Vec<serde_json::Value>>>,
    list_calls: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Recorded>>;

fn handle(
    recorded: &Shared,
    request: &Request<hyper::body::Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let path = request.uri().path().to_owned();
    let watching = request
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
    let mut recorded = recorded.lock().unwrap();
    if !watching {
        *recorded.list_calls.entry(path.clone()).or_default() += 1;
        let items = recorded.lists.get(&path).cloned().unwrap_or_default();
        let list = serde_json::json!({
            "kind": "List", "apiVersion": "v1",
            "metadata": { "resourceVersion": "100" },
            "items": items,
        });
        return Response::new(BodyExt::boxed(Full::new(Bytes::from(list.to_string()))));
    }
    let events = recorded
        .watches
        .get_mut(&path)
        .filter(|w| !w.is_empty())
        .map(|w| w.remove(0));
    let lines: Vec<Result<Frame<Bytes>, Infallible>> = events
        .unwrap_or_default()
        .into_iter()
        .map(|e| Ok(Frame::data(Bytes::from(format!("{e}\n")))))
        .collect();
    // Watches end after a while, as a real API server's do (timeoutSeconds),
    // and the watcher opens the next one.
    let end = futures::stream::once(tokio::time::sleep(Duration::from_millis(300)))
        .filter_map(|()| async { None::<Result<Frame<Bytes>, Infallible>> });
    let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(lines).chain(end)));
    Response::new(body)
}

async fn serve(recorded: Shared) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = handle(&recorded, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

fn example() -> Vec<Object> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let update = FileSource::new(dir).scan().unwrap();
    update.applied().cloned().collect()
}

fn to_json(object: &Object) -> serde_json::Value {
    match object {
        Object::Namespace(o) => serde_json::to_value(o),
        Object::Service(o) => serde_json::to_value(o),
        Object::Endpoints(o) => serde_json::to_value(o),
        Object::EndpointSlice(o) => serde_json::to_value(o),
        Object::Pod(o) => serde_json::to_value(o),
        Object::ServiceAccount(o) => serde_json::to_value(o),
        Object::TrafficTarget(o) => serde_json::to_value(o),
        Object::HttpRouteGroup(o) => serde_json::to_value(o),
        Object::TcpRoute(o) => serde_json::to_value(o),
        Object::TrafficSplit(o) => serde_json::to_value(o),
        Object::MeshConfig(o) => serde_json::to_value(o),
        Object::Egress(o) => serde_json::to_value(o),
        Object::IngressBackend(o) => serde_json::to_value(o),
        Object::Retry(o) => serde_json::to_value(o),
        Object::UpstreamTrafficSetting(o) => serde_json::to_value(o),
    }
    .unwrap()
}

async fn wait_for(
    status: &mut tokio::sync::watch::Receiver<Arc<Status>>,
    what: &str,
    done: impl Fn(&Status) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if done(&status.borrow_and_update()) {
                return;
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_lists_watches_and_relists_after_410_gone() {
    let paths: HashMap<String, String> = trellis_leader::source::kube::watched()
        .iter()
        .map(|r| (r.kind.clone(), path_of(r)))
        .collect();
    let mut recorded = Recorded::default();
    let mut moved_slice = None;
    for object in example() {
        let kind = object.object_ref().kind;
        let mut json = to_json(&object);
        json["metadata"]["resourceVersion"] = "100".into();
        if object.object_ref().name == "bookstore-v1-slice" {
            moved_slice = Some(json.clone());
        }
        recorded
            .lists
            .entry(paths[kind].clone())
            .or_default()
            .push(json);
    }
    // A custom resource the API server accepted but that does not fit the
    // TrafficSplit schema: reported, the rest of the mesh compiles.
    let splits = &paths["TrafficSplit"];
    recorded.lists.get_mut(splits).unwrap().push(serde_json::json!({
        "apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
        "metadata": { "name": "garbled", "namespace": "bookstore", "resourceVersion": "100" },
        "spec": { "service": "bookstore", "backends": [{ "service": "bookstore-v1", "weight": "heavy" }] }
    }));

    let recorded = Arc::new(Mutex::new(recorded));
    let url = serve(recorded.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let pipeline = Pipeline::new(
        PipelineConfig {
            quiet: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    let mut status = pipeline.status();
    let store = Arc::new(trellis_edge::SnapshotStore::new());
    let (updates, received) = mpsc::channel(16);
    tokio::spawn(KubeSource::new(client).run(updates));
    tokio::spawn(pipeline.run(received, store.clone()));

    wait_for(&mut status, "the bookstore's six classes", |s| {
        s.classes.len() == 6
    })
    .await;
    let problems: Vec<String> = status
        .borrow()
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("TrafficSplit bookstore/garbled")),
        "{problems:?}"
    );

    // bookstore-v1 moves; the EndpointSlice watch then expires, and the
    // re-list brings the new address.
    let mut moved = moved_slice.unwrap();
    moved["endpoints"][0]["addresses"][0] = "10.0.3.11".into();
    {
        let mut recorded = recorded.lock().unwrap();
        let slices = paths["EndpointSlice"].clone();
        let list = recorded.lists.get_mut(&slices).unwrap();
        // mysql's slice is gone from the re-list: its endpoints must go.
        list.retain(|s| {
            s["metadata"]["name"] != "bookstore-v1-slice" && s["metadata"]["name"] != "mysql-slice"
        });
        list.push(moved);
        let gone = serde_json::json!({ "type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 100 (200)", "reason": "Expired", "code": 410 } });
        recorded.watches.insert(slices, vec![vec![gone]]);
    }
    let slices = paths["EndpointSlice"].clone();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let snapshot = store.load();
            let address = snapshot
                .get(
                    &Scope::Service("bookstore/bookstore-v1".into()),
                    type_url::ENDPOINT,
                    "bookstore/bookstore-v1|14001",
                )
                .map(|r| String::from_utf8_lossy(r.any()).contains("10.0.3.11"));
            if address == Some(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the re-list after 410 never arrived; list calls: {:?}",
            recorded.lock().unwrap().list_calls.get(&slices)
        )
    });
    assert!(
        recorded.lock().unwrap().list_calls[&slices] >= 2,
        "the watcher re-listed"
    );
    let snapshot = store.load();
    // With its slice gone, mysql has no endpoint, so (SMI) nobody reaches
    // it: its assignment is gone, or at least empty.
    let mysql = snapshot.get(
        &Scope::Service("bookwarehouse/mysql".into()),
        type_url::ENDPOINT,
        "bookwarehouse/mysql|3306",
    );
    assert!(
        mysql.is_none_or(|r| !String::from_utf8_lossy(r.any()).contains("10.0.5.10")),
        "a slice missing from the re-list is deleted"
    );

    {
        let mut recorded = recorded.lock().unwrap();
        // Then the bookstore TrafficTarget is deleted, seen on its watch.
        let targets = paths["TrafficTarget"].clone();
        let position = recorded.lists[&targets]
            .iter()
            .position(|t| t["metadata"]["name"] == "bookstore")
            .unwrap();
        let mut target = recorded.lists.get_mut(&targets).unwrap().remove(position);
        target["metadata"]["resourceVersion"] = "201".into();
        recorded.watches.insert(
            targets,
            vec![vec![
                serde_json::json!({ "type": "DELETED", "object": target }),
            ]],
        );
    }
    // The DELETED TrafficTarget leaves bookbuyer without an outbound listener.
    let buyer = status
        .borrow()
        .classes
        .iter()
        .find(|(_, c)| c.pods.contains(&"bookbuyer/bookbuyer-0".to_owned()))
        .map(|(id, _)| id.clone())
        .expect("bookbuyer's class");
    tokio::time::timeout(Duration::from_secs(20), async {
        while store.load().class(&buyer).iter(type_url::LISTENER).count() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("bookbuyer loses its outbound listener when its TrafficTarget is deleted");
}
