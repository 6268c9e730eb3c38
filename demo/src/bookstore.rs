//! The bookstore example stood up as real pods: one per Pod manifest, at a
//! bridge address; each with its application (an HTTP server on the target
//! ports of its HTTP services, a TCP server on those of its TCP services,
//! nothing for a pure client) and a real Envoy sidecar behind the
//! interception rules, configured by Trellis over mTLS xDS.
//!
//! Pods of the example in namespaces outside the mesh are stood up too,
//! without interception or sidecar: nginx as the ingress controller when
//! the pod's image is nginx's (proxying to the backend of the example's
//! IngressBackend), else a server on the pod's container ports (the
//! destination of the example's Egress policy).
//!
//! Trellis watches a copy of the example adapted to the pods: pod IPs
//! become bridge addresses, cluster IPs become addresses only the sidecars'
//! outbound listeners know, and every pod is annotated for Prometheus, as
//! `osm metrics enable` would. Each pod resolves the services' names to
//! their cluster IPs, as cluster DNS would. Edit the copy
//! ([`Bookstore::manifests`]) and the mesh follows.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod as PodObject;
use trellis_leader::{
    ca::BuiltinCa,
    catalog::{self, AppProtocol, Catalog, ServiceKey},
    kinds::{Object, ObjectRef},
    pipeline::PipelineConfig,
    source::files::FileSource,
};

use crate::{
    control::ControlPlane,
    error::{io, DemoError},
    nginx,
    pods::{Binaries, Net, Pod},
};

/// How long a sidecar may take to get its first configuration.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The first pod's host number on the bridge.
const FIRST_POD: u8 = 10;
/// Where the ingress controller listens in its pod.
pub const INGRESS_PORT: u16 = 80;

/// How to stand the bookstore up.
#[derive(Clone, Debug)]
pub struct BookstoreConfig {
    /// The bridge's subnet number: pods at `10.77.<subnet>.*`, cluster IPs
    /// at `10.96.<subnet>.*`. Runs side by side need different ones.
    pub subnet: u8,
    /// The example's manifest directory (`examples/bookstore`).
    pub example: PathBuf,
    /// Envoy and the demo's own executable.
    pub binaries: Binaries,
    /// The CA the leader issues from.
    pub ca: Arc<BuiltinCa>,
    /// The leader pipeline's settings.
    pub pipeline: PipelineConfig,
}

/// A service as the pods reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAddress {
    /// Namespace and name.
    pub key: ServiceKey,
    /// Its cluster IP.
    pub ip: Ipv4Addr,
    /// Its ports and how each is handled.
    pub ports: Vec<(u16, AppProtocol)>,
}

/// The bookstore mesh, up; torn down when dropped.
#[derive(Debug)]
pub struct Bookstore {
    // Dropped in this order: pods, then their bridge (held only to be
    // deleted then), then Trellis.
    pods: BTreeMap<String, Pod>,
    outside: BTreeMap<String, Pod>,
    _net: Net,
    control: ControlPlane,
    services: Vec<ServiceAddress>,
    dir: PathBuf,
}

/// What a pod outside the mesh runs.
enum Outside {
    /// nginx, as the ingress controller.
    Ingress,
    /// The demo's server, on these HTTP ports.
    Server(Vec<u16>),
}

/// Where each pod and service of the example goes.
struct Layout {
    /// Pod `<ns>/<name>` → its host number on the bridge.
    pods: BTreeMap<String, u8>,
    /// Pods outside the mesh: host number and what they run.
    outside: BTreeMap<String, (u8, Outside)>,
    /// The example's addresses → the bridge's.
    addresses: HashMap<IpAddr, IpAddr>,
    services: Vec<ServiceAddress>,
}

impl Layout {
    fn of(
        catalog: &Catalog,
        objects: &BTreeMap<ObjectRef, Object>,
        net: &Net,
    ) -> Result<Layout, DemoError> {
        let outside: Vec<(String, &PodObject)> = (objects.iter())
            .filter_map(|(r, object)| match object {
                Object::Pod(pod) => Some((format!("{}/{}", r.namespace, r.name), pod)),
                _ => None,
            })
            .filter(|(name, _)| !catalog.pods.contains_key(name))
            .collect();
        let room = usize::from(u8::MAX - FIRST_POD);
        let needed = (catalog.pods.len() + outside.len()).max(catalog.services.len());
        if needed > room {
            return Err(DemoError::TooLarge { needed, room });
        }
        let mut layout = Layout {
            pods: BTreeMap::new(),
            outside: BTreeMap::new(),
            addresses: HashMap::new(),
            services: Vec::new(),
        };
        let mut hosts = FIRST_POD..;
        // Pods first in each zip: a host number is taken only for a pod.
        for (pod, host) in catalog.pods.values().zip(hosts.by_ref()) {
            layout.pods.insert(pod.name.clone(), host);
            if let Some(ip) = pod.ip {
                let new = net.pod_address(host);
                layout.addresses.insert(ip, IpAddr::V4(new));
            }
        }
        for ((name, pod), host) in outside.into_iter().zip(hosts) {
            let ip = (pod.status.as_ref())
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok());
            if let Some(ip) = ip {
                layout
                    .addresses
                    .insert(ip, IpAddr::V4(net.pod_address(host)));
            }
            let containers = pod.spec.iter().flat_map(|s| &s.containers);
            let runs = if containers
                .clone()
                .any(|c| c.image.as_deref().is_some_and(|i| i.contains("nginx")))
            {
                Outside::Ingress
            } else {
                let ports = (containers.flat_map(|c| c.ports.iter().flatten()))
                    .filter_map(|p| u16::try_from(p.container_port).ok())
                    .collect();
                Outside::Server(ports)
            };
            layout.outside.insert(name, (host, runs));
        }
        let with_ip = catalog
            .services
            .values()
            .filter_map(|s| Some((s, s.cluster_ip?)));
        for (n, (service, ip)) in (1..).zip(with_ip) {
            let new = net.cluster_ip(n);
            layout.addresses.insert(ip, IpAddr::V4(new));
            layout.services.push(ServiceAddress {
                key: service.key.clone(),
                ip: new,
                ports: service.ports.iter().map(|p| (p.port, p.protocol)).collect(),
            });
        }
        Ok(layout)
    }

    /// The names a pod in `namespace` resolves: every service's
    /// `svc.ns[.svc[.cluster.local]]`, and bare `svc` in its own namespace.
    fn hosts(&self, namespace: &str) -> Vec<(IpAddr, Vec<String>)> {
        (self.services.iter())
            .map(|s| {
                let (svc, ns) = (&s.key.name, &s.key.namespace);
                let mut names = vec![
                    format!("{svc}.{ns}"),
                    format!("{svc}.{ns}.svc"),
                    format!("{svc}.{ns}.svc.cluster.local"),
                ];
                if ns == namespace {
                    names.push(svc.clone());
                }
                (IpAddr::V4(s.ip), names)
            })
            .collect()
    }
}

impl Bookstore {
    /// Stands the example up and waits until every sidecar has its first
    /// configuration.
    pub async fn up(config: BookstoreConfig) -> Result<Bookstore, DemoError> {
        let net = Net::create(config.subnet)?;
        let mut example = FileSource::new(&config.example);
        let update = example.scan()?;
        if let Some(problem) = update.problems.first() {
            return Err(DemoError::Adapt {
                file: config.example.display().to_string(),
                reason: problem.to_string(),
            });
        }
        let objects = update
            .applied()
            .map(|o| (o.object_ref(), o.clone()))
            .collect();
        let catalog = catalog::build(&objects, &config.pipeline.mesh);
        let layout = Layout::of(&catalog, &objects, &net)?;

        let dir = std::env::temp_dir().join(format!("trellis-bookstore-{}", config.subnet));
        let _ = std::fs::remove_dir_all(&dir);
        // What was stood up before a failure goes as it drops; the copy
        // goes here.
        match Bookstore::start(&config, &catalog, &layout, &net, &dir).await {
            Ok((pods, outside, control)) => Ok(Bookstore {
                pods,
                outside,
                _net: net,
                control,
                services: layout.services,
                dir,
            }),
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(error)
            }
        }
    }

    /// Copies the adapted example to `dir`, starts Trellis on it, then the
    /// pods, and waits for their sidecars.
    async fn start(
        config: &BookstoreConfig,
        catalog: &Catalog,
        layout: &Layout,
        net: &Net,
        dir: &Path,
    ) -> Result<(BTreeMap<String, Pod>, BTreeMap<String, Pod>, ControlPlane), DemoError> {
        copy_adapted(&config.example, dir, &layout.addresses)?;
        let host = IpAddr::V4(net.host());
        let control =
            ControlPlane::start(dir, host, config.ca.clone(), config.pipeline.clone()).await?;
        let mut pods = BTreeMap::new();
        for (name, host) in &layout.pods {
            let (namespace, short) = name.split_once('/').unwrap_or(("", name));
            let pod = net.pod(short, *host, &config.binaries)?;
            pod.set_hosts(&layout.hosts(namespace))?;
            pod.intercept()?;
            pod.start_envoy(&control.bootstrap(name)?)?;
            if let Some(args) = app_args(catalog, name) {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                pod.start_app(&args)?;
            }
            pods.insert(name.clone(), pod);
        }
        let mut outside = BTreeMap::new();
        for (name, (host, runs)) in &layout.outside {
            let (namespace, short) = name.split_once('/').unwrap_or(("", name));
            let pod = net.pod(short, *host, &config.binaries)?;
            pod.set_hosts(&layout.hosts(namespace))?;
            match runs {
                Outside::Ingress => {
                    nginx::start(&pod, INGRESS_PORT, &ingress_upstreams(catalog, layout))?
                }
                Outside::Server(ports) => {
                    let mut args = vec!["serve".to_owned(), "--pod".to_owned(), name.clone()];
                    for port in ports {
                        args.extend(["--http".to_owned(), port.to_string()]);
                    }
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    pod.start_app(&args)?;
                }
            }
            outside.insert(name.clone(), pod);
        }
        for pod in pods.values() {
            pod.wait_envoy_ready(READY_TIMEOUT).await?;
        }
        Ok((pods, outside, control))
    }

    /// The pod `<ns>/<name>`.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.get(name)
    }

    /// Every meshed pod, by `<ns>/<name>`.
    pub fn pods(&self) -> &BTreeMap<String, Pod> {
        &self.pods
    }

    /// The pods outside the mesh (the ingress controller, the egress
    /// destination), by `<ns>/<name>`.
    pub fn outside(&self) -> &BTreeMap<String, Pod> {
        &self.outside
    }

    /// The services with a cluster IP.
    pub fn services(&self) -> &[ServiceAddress] {
        &self.services
    }

    /// Trellis, serving the pods.
    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    /// The manifest directory Trellis watches.
    pub fn manifests(&self) -> &Path {
        &self.dir
    }

    /// Replaces (or adds) the manifest `name` with `text` at once, so the
    /// watcher never reads half a file: written beside it under a hidden
    /// name, which the file source skips, then renamed.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<(), DemoError> {
        let path = self.dir.join(name);
        let partial = self.dir.join(format!(".{name}.partial"));
        let writing = || io(format!("writing {}", path.display()));
        std::fs::write(&partial, text).map_err(writing())?;
        std::fs::rename(&partial, &path).map_err(writing())
    }

    /// The manifest `name`'s text.
    pub fn read_manifest(&self, name: &str) -> Result<String, DemoError> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))
    }

    /// Removes the manifest `name`.
    pub fn remove_manifest(&self, name: &str) -> Result<(), DemoError> {
        let path = self.dir.join(name);
        std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))
    }
}

impl Drop for Bookstore {
    fn drop(&mut self) {
        // Pods before the bridge (field order drops the rest after this).
        self.pods.clear();
        self.outside.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the ingress controller sends requests: the pods of the first
/// IngressBackend's backend, on its port, at their bridge addresses.
fn ingress_upstreams(catalog: &Catalog, layout: &Layout) -> Vec<SocketAddr> {
    let Some((service, rules)) = catalog.ingress.iter().next() else {
        return Vec::new();
    };
    let Some(port) = rules.first().map(|r| r.port) else {
        return Vec::new();
    };
    (catalog.services.get(service).into_iter())
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| layout.addresses.get(&e.ip))
        .map(|ip| SocketAddr::new(*ip, port))
        .collect()
}

/// `serve` arguments for the application of pod `name`: the target ports
/// of the services it backs, HTTP or TCP; `None` for a pod backing none.
fn app_args(catalog: &Catalog, name: &str) -> Option<Vec<String>> {
    let pod = catalog.pods.get(name)?;
    let mut ports: BTreeSet<(bool, u16)> = BTreeSet::new();
    for service in pod.services.iter().filter_map(|s| catalog.services.get(s)) {
        for port in &service.ports {
            ports.insert((port.protocol.is_http(), port.target_port));
        }
    }
    if ports.is_empty() {
        return None;
    }
    let mut args = vec!["serve".to_owned(), "--pod".to_owned(), name.to_owned()];
    for (http, port) in ports {
        args.push(if http { "--http" } else { "--tcp" }.to_owned());
        args.push(port.to_string());
    }
    Some(args)
}

/// Copies the manifests under `from` into `to`, adapted ([`adapt`]).
fn copy_adapted(
    from: &Path,
    to: &Path,
    addresses: &HashMap<IpAddr, IpAddr>,
) -> Result<(), DemoError> {
    let mut dirs = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((from, to)) = dirs.pop() {
        std::fs::create_dir_all(&to).map_err(io(format!("creating {}", to.display())))?;
        let entries =
            std::fs::read_dir(&from).map_err(io(format!("reading {}", from.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("reading {}", from.display())))?;
            let (source, target) = (entry.path(), to.join(entry.file_name()));
            if source.is_dir() {
                dirs.push((source, target));
                continue;
            }
            let text = std::fs::read_to_string(&source)
                .map_err(io(format!("reading {}", source.display())))?;
            let adapted = adapt(&text, addresses).map_err(|reason| DemoError::Adapt {
                file: source.display().to_string(),
                reason,
            })?;
            std::fs::write(&target, adapted)
                .map_err(io(format!("writing {}", target.display())))?;
        }
    }
    Ok(())
}

/// One manifest file adapted to the pods: every address the layout moves
/// replaced, and every Pod without a `prometheus.io/scrape` annotation
/// given one (its `metadata` must be a block without `annotations`).
fn adapt(text: &str, addresses: &HashMap<IpAddr, IpAddr>) -> Result<String, String> {
    let text = move_addresses(text, addresses);
    let mut out = String::with_capacity(text.len());
    let mut document: Vec<&str> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            out.push_str(&scraped(&document)?);
            out.push_str(line);
            document.clear();
        } else {
            document.push(line);
        }
    }
    out.push_str(&scraped(&document)?);
    Ok(out)
}

/// `text` with each run of digits and dots that is an address in
/// `addresses` replaced by its new address.
fn move_addresses(text: &str, addresses: &HashMap<IpAddr, IpAddr>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let token = &rest[..end];
        match token.parse::<IpAddr>().ok().and_then(|a| addresses.get(&a)) {
            Some(new) => out.push_str(&new.to_string()),
            None => out.push_str(token),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A YAML document's lines, with a Pod annotated for Prometheus.
fn scraped(document: &[&str]) -> Result<String, String> {
    let is_pod = document.iter().any(|l| l.trim_end() == "kind: Pod");
    if !is_pod || document.iter().any(|l| l.contains("prometheus.io/scrape")) {
        return Ok(document.concat());
    }
    let metadata = document
        .iter()
        .position(|l| l.trim_end() == "metadata:")
        .ok_or("a Pod whose metadata is not a YAML block")?;
    let indent: String = document
        .get(metadata + 1)
        .map(|l| l.chars().take_while(|c| *c == ' ').collect())
        .filter(|i: &String| !i.is_empty())
        .ok_or("a Pod with empty metadata")?;
    if document
        .iter()
        .any(|l| l.starts_with(&format!("{indent}annotations:")))
    {
        return Err("a Pod with annotations but no prometheus.io/scrape".to_owned());
    }
    let mut lines: Vec<String> = document.iter().map(|l| (*l).to_owned()).collect();
    lines.insert(
        metadata + 1,
        format!("{indent}annotations: {{ prometheus.io/scrape: \"true\" }}\n"),
    );
    Ok(lines.concat())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn adapting_moves_known_addresses_only_and_annotates_pods() {
        let addresses =
            HashMap::from([("10.0.3.1".parse().unwrap(), "10.77.9.10".parse().unwrap())]);
        let text = "kind: Pod\nmetadata:\n  name: a\nstatus: { podIP: 10.0.3.1 }\n---\n\
                    kind: Service\nspec: { clusterIP: 10.0.3.10 }\n";
        let adapted = adapt(text, &addresses).unwrap();
        assert_eq!(
            adapted,
            "kind: Pod\nmetadata:\n  annotations: { prometheus.io/scrape: \"true\" }\n  name: a\n\
             status: { podIP: 10.77.9.10 }\n---\nkind: Service\nspec: { clusterIP: 10.0.3.10 }\n"
        );
        let scraped_already =
            "kind: Pod\nmetadata:\n  annotations: { prometheus.io/scrape: \"true\" }\n";
        assert_eq!(adapt(scraped_already, &addresses).unwrap(), scraped_already);
        let other_annotations = "kind: Pod\nmetadata:\n  annotations: { a: b }\n";
        assert!(adapt(other_annotations, &addresses).is_err());
    }
}
