//! The smallest mesh the end-to-end tests stand up: a client pod and a
//! server pod on a bridge of their own, the client resolving
//! `server.demo` to the server's Service address, and a scratch
//! directory for the manifests Trellis watches.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};
use trellis_shared::bootstrap::EnvoyBootstrap;

use crate::{error::io, manifests, Binaries, ControlPlane, DemoError, Net, Pod};

/// How long the sidecars may take to carry a first request.
const FIRST_REQUEST: Duration = Duration::from_secs(30);

/// The pods, their bridge and the manifests' directory; all removed when
/// dropped (pods before their bridge).
#[derive(Debug)]
pub struct ClientServer {
    /// Pod `demo/client-0`, at host 2 of the bridge.
    pub client: Pod,
    /// Pod `demo/server-0`, at host 3.
    pub server: Pod,
    /// The Service `demo/server`'s cluster IP.
    pub service_ip: IpAddr,
    /// Where the manifests go (`mesh.yaml`).
    pub dir: PathBuf,
    /// The bridge.
    pub net: Net,
}

impl ClientServer {
    /// Creates the pods on bridge `subnet` with `binaries`, and an empty
    /// directory `trellis-<name>-<pid>` for the manifests.
    pub fn create(subnet: u8, binaries: &Binaries, name: &str) -> Result<ClientServer, DemoError> {
        let net = Net::create(subnet)?;
        let server = net.pod("server", 3, binaries)?;
        let client = net.pod("client", 2, binaries)?;
        let service_ip = IpAddr::V4(net.cluster_ip(10));
        client.set_hosts(&[(service_ip, vec!["server.demo".to_owned()])])?;
        let dir = std::env::temp_dir().join(format!("trellis-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(ClientServer {
            client,
            server,
            service_ip,
            dir,
            net,
        })
    }

    /// The mesh under MeshConfig `spec`: the client allowed to call the
    /// server's HTTP service on port 8080.
    pub fn manifests(&self, spec: &str) -> String {
        manifests::client_and_server(
            spec,
            self.client.ip(),
            self.server.ip(),
            &self.service_ip.to_string(),
        )
    }

    /// Trellis (issuing from `ca`, compiling with `config`) serving the
    /// manifests written, both pods intercepted with their sidecars, the
    /// server's application up, and a first request through both
    /// sidecars answered.
    pub async fn serve(
        &self,
        ca: Arc<BuiltinCa>,
        config: PipelineConfig,
    ) -> Result<ControlPlane, DemoError> {
        let host = IpAddr::V4(self.net.host());
        let control = ControlPlane::start(&self.dir, host, ca, config).await?;
        self.start_pods(|pod| control.bootstrap(pod)).await?;
        Ok(control)
    }

    /// Both pods intercepted with their sidecars (each bootstrapped by
    /// `bootstrap`, given the pod's `<ns>/<name>`), the server's
    /// application up, and a first request through both sidecars
    /// answered: for a control plane other than [`ControlPlane`].
    pub async fn start_pods(
        &self,
        bootstrap: impl Fn(&str) -> Result<EnvoyBootstrap, DemoError>,
    ) -> Result<(), DemoError> {
        for (pod, name) in [
            (&self.server, "demo/server-0"),
            (&self.client, "demo/client-0"),
        ] {
            pod.intercept()?;
            pod.start_envoy(&bootstrap(name)?)?;
        }
        self.server
            .start_app(&["serve", "--pod", "demo/server-0", "--http", "8080"])?;
        let deadline = tokio::time::Instant::now() + FIRST_REQUEST;
        loop {
            let reply = self.client.get("http://server.demo:8080/").await;
            if reply.is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DemoError::Timeout(
                    FIRST_REQUEST,
                    format!(
                        "a first request through both sidecars\nclient envoy:\n{}\nserver envoy:\n{}",
                        self.client.busy_stats().await,
                        self.server.busy_stats().await
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes `manifests` where Trellis watches them.
    pub fn write(&self, manifests: &str) -> Result<(), DemoError> {
        let path: &Path = &self.dir.join("mesh.yaml");
        std::fs::write(path, manifests).map_err(io(format!("writing {}", path.display())))
    }
}
