//! `trellis rotate-ca --leader` and `trellis ca-status`: an operator's calls
//! to a leader group's `MeshRoot` service, over mTLS as one of the group's
//! operators.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tonic::{transport::Endpoint, Code};
use trellis_leader::ca::{NEXT_CA_CERT, NEXT_CA_KEY};
use trellis_proto::trellis::ca::v1::{
    mesh_root_client::MeshRootClient, RootStatus, RotateRequest, StatusRequest,
};
use trellis_transport::{identity::leader_server_name, ControlTls};

/// How to reach the group as an operator.
#[derive(clap::Args)]
pub(crate) struct GroupAccess {
    /// Every replica's publish address (`https://host:port`), comma
    /// separated: the leader is found among them.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) leader: Vec<String>,
    /// Directory of the operator's control-plane certificate (tls.crt,
    /// tls.key, ca.crt), as `trellis control-cert --role operator` writes.
    #[arg(long)]
    pub(crate) control_tls_dir: PathBuf,
    /// The leader group's name.
    #[arg(long, default_value = "trellis")]
    pub(crate) cluster: String,
}

impl GroupAccess {
    /// A channel to each replica, by its address, whose calls give up
    /// after `timeout`.
    pub(crate) fn channels(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Vec<(String, tonic::transport::Channel)>> {
        let tls = ControlTls::from_dir(&self.control_tls_dir).with_context(|| {
            format!(
                "reading the operator certificate in {}",
                self.control_tls_dir.display()
            )
        })?;
        let mut clients = Vec::new();
        for address in &self.leader {
            let channel = Endpoint::from_shared(address.clone())
                .with_context(|| format!("--leader {address:?}"))?
                .connect_timeout(std::time::Duration::from_secs(2))
                .timeout(timeout)
                .tls_config(tls.client(&leader_server_name(&self.cluster)))?
                .connect_lazy();
            clients.push((address.clone(), channel));
        }
        Ok(clients)
    }

    fn clients(&self) -> Result<Vec<(String, MeshRootClient<tonic::transport::Channel>)>> {
        let channels = self
            .channels(std::time::Duration::from_secs(10))?
            .into_iter();
        Ok(channels
            .map(|(address, channel)| (address, MeshRootClient::new(channel)))
            .collect())
    }
}

/// Prints `status` as `trellis ca-status` and `rotate-ca` do.
fn print(status: &RootStatus, json: bool) -> Result<()> {
    let roots = status.trust_bundle_pem.matches("BEGIN CERTIFICATE").count();
    if json {
        let value = serde_json::json!({
            "step": status.step,
            "provider": status.provider,
            "sinceMs": status.since_ms,
            "trustedRoots": roots,
            "signingCertPem": status.signing_cert_pem,
            "trustBundlePem": status.trust_bundle_pem,
            "replica": status.replica,
            "leader": status.leader,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "leaves signed by {}; root rotation: {} ({roots} trusted root(s)); replica {} answered, leader {}",
            status.provider, status.step, status.replica, status.leader
        );
    }
    Ok(())
}

/// `trellis rotate-ca --leader`: asks each replica in turn until the leader
/// takes the rotation.
pub(crate) async fn rotate(
    access: &GroupAccess,
    next_ca_dir: Option<&Path>,
    provider: Option<String>,
) -> Result<()> {
    let mut request = match next_ca_dir {
        None => RotateRequest::default(),
        Some(dir) => {
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name))
                    .with_context(|| format!("reading {}", dir.join(name).display()))
            };
            RotateRequest {
                next_cert_pem: read(NEXT_CA_CERT)?,
                next_key_pem: read(NEXT_CA_KEY)?,
                ..RotateRequest::default()
            }
        }
    };
    request.provider = provider.unwrap_or_default();
    let mut tried = Vec::new();
    for (address, mut client) in access.clients()? {
        match client.rotate(request.clone()).await {
            Ok(status) => {
                println!("the leader took the rotation; it proceeds by itself");
                return print(status.get_ref(), false);
            }
            // A follower, or a replica that cannot be reached: the next.
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                    || status.message().contains("does not lead") =>
            {
                tried.push(format!("{address}: {}", status.message()));
            }
            Err(status) => bail!("{address}: {}", status.message()),
        }
    }
    bail!("no replica took the rotation: {}", tried.join("; "))
}

/// `trellis ca-status`: the first replica answering.
pub(crate) async fn status(access: &GroupAccess, json: bool) -> Result<()> {
    let mut tried = Vec::new();
    for (address, mut client) in access.clients()? {
        match client.status(StatusRequest {}).await {
            Ok(status) => return print(status.get_ref(), json),
            Err(status) => tried.push(format!("{address}: {}", status.message())),
        }
    }
    bail!("no replica answered: {}", tried.join("; "))
}
