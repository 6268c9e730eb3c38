//! The smallest mesh the end-to-end tests stand up: a client pod and a
//! server pod on a bridge of their own, the client resolving
//! `server.demo` to the server's Service address, and a scratch
//! directory for the manifests Trellis watches.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{error::io, manifests, Binaries, DemoError, Net, Pod};

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

    /// Writes `manifests` where Trellis watches them.
    pub fn write(&self, manifests: &str) -> Result<(), DemoError> {
        let path: &Path = &self.dir.join("mesh.yaml");
        std::fs::write(path, manifests).map_err(io(format!("writing {}", path.display())))
    }
}
