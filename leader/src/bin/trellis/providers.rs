//! `--certificate-manager` and its flags: where the mesh's leaves come
//! from, chosen as OSM v1.2's osm-controller chose it (`tresor`, `vault`,
//! `cert-manager`, and the same `--vault-*` names), with what Trellis adds
//! (the PKI mount, Vault's CA, Kubernetes auth, token from a file).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use trellis_leader::ca::{
    CertManagerConfig, CertManagerIssuer, External, VaultAuth, VaultConfig, VaultIssuer,
};

/// The certificate providers, by OSM's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Provider {
    /// The built-in CA (OSM called it Tresor).
    Tresor,
    /// A Vault (or OpenBao) PKI secrets engine.
    Vault,
    /// cert-manager: CertificateRequests against an Issuer or
    /// ClusterIssuer.
    CertManager,
}

/// Where the mesh's leaves come from.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct CertificateManagerArgs {
    /// Who signs the mesh's leaves. Bootstrap (xDS) certificates are
    /// signed by the built-in CA under every provider. Changing it on a
    /// running leader group is a root rotation: both trust bundles, then
    /// leaves reissued, then the old root dropped.
    #[arg(long, value_enum, default_value = "tresor")]
    certificate_manager: Provider,
    /// Vault's host name or address.
    #[arg(long)]
    vault_host: Option<String>,
    /// Vault's port.
    #[arg(long, default_value_t = 8200)]
    vault_port: u16,
    /// `https`, or `http` (the token and every private key then cross the
    /// network in clear: development only).
    #[arg(long, default_value = "https")]
    vault_protocol: String,
    /// The PKI role leaves are issued under.
    #[arg(long, default_value = "openservicemesh")]
    vault_role: String,
    /// The PKI secrets engine's mount path.
    #[arg(long, default_value = "pki")]
    vault_pki_mount: String,
    /// A file holding the Vault token (a mounted Secret); else the
    /// VAULT_TOKEN environment variable, unless Kubernetes auth is used.
    #[arg(long)]
    vault_token_file: Option<PathBuf>,
    /// Log in with Vault's Kubernetes auth method as this Vault role, with
    /// the pod's ServiceAccount token, instead of a token.
    #[arg(long, conflicts_with = "vault_token_file")]
    vault_kubernetes_role: Option<String>,
    /// The Kubernetes auth method's mount path.
    #[arg(long, default_value = "kubernetes")]
    vault_kubernetes_mount: String,
    /// The ServiceAccount token file for Kubernetes auth.
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    vault_kubernetes_token_file: PathBuf,
    /// Roots Vault's serving certificate is verified with (PEM); default:
    /// the public web roots.
    #[arg(long)]
    vault_ca_file: Option<PathBuf>,
    /// How many issue requests are in flight at once while a batch of
    /// leaves is renewed.
    #[arg(long, default_value_t = 16)]
    vault_concurrency: usize,
    /// The cert-manager Issuer or ClusterIssuer signing leaves.
    #[arg(long, default_value = "osm-ca")]
    cert_manager_issuer_name: String,
    /// `Issuer` or `ClusterIssuer`.
    #[arg(long, default_value = "Issuer")]
    cert_manager_issuer_kind: String,
    /// The issuer's API group.
    #[arg(long, default_value = "cert-manager.io")]
    cert_manager_issuer_group: String,
    /// Where CertificateRequests are made (an Issuer's namespace).
    #[arg(long, default_value = "trellis-system")]
    cert_manager_namespace: String,
    /// The Secret in that namespace whose `ca.crt` is the issuer's CA: the
    /// mesh's trust bundle.
    #[arg(long, default_value = "osm-ca-bundle")]
    cert_manager_ca_secret: String,
    /// How long a batch of CertificateRequests may wait to be signed, in
    /// seconds.
    #[arg(long, default_value_t = 30)]
    cert_manager_wait_secs: u64,
}

impl CertificateManagerArgs {
    /// The external issuer asked for; `None` for the built-in CA.
    pub(crate) async fn external(&self) -> Result<Option<External>> {
        match self.certificate_manager {
            Provider::Tresor => Ok(None),
            Provider::CertManager => {
                if !matches!(
                    self.cert_manager_issuer_kind.as_str(),
                    "Issuer" | "ClusterIssuer"
                ) {
                    bail!(
                        "--cert-manager-issuer-kind {:?}: Issuer or ClusterIssuer",
                        self.cert_manager_issuer_kind
                    );
                }
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))
                    .context("--certificate-manager cert-manager needs the Kubernetes API")?;
                let config = CertManagerConfig {
                    namespace: self.cert_manager_namespace.clone(),
                    issuer_name: self.cert_manager_issuer_name.clone(),
                    issuer_kind: self.cert_manager_issuer_kind.clone(),
                    issuer_group: self.cert_manager_issuer_group.clone(),
                    ca_secret: self.cert_manager_ca_secret.clone(),
                    wait: Duration::from_secs(self.cert_manager_wait_secs),
                    concurrency: 16,
                };
                let issuer = CertManagerIssuer::connect(client, config)
                    .await
                    .context("--certificate-manager cert-manager")?;
                Ok(Some(External {
                    provider: "cert-manager",
                    issuer: Arc::new(issuer),
                }))
            }
            Provider::Vault => {
                let config = self.vault()?;
                // Blocking HTTP: off the runtime.
                let issuer = tokio::task::spawn_blocking(move || VaultIssuer::connect(config))
                    .await?
                    .context("--certificate-manager vault")?;
                Ok(Some(External {
                    provider: "vault",
                    issuer: Arc::new(issuer),
                }))
            }
        }
    }

    fn vault(&self) -> Result<VaultConfig> {
        let Some(host) = &self.vault_host else {
            bail!("--certificate-manager vault needs --vault-host");
        };
        if !matches!(self.vault_protocol.as_str(), "https" | "http") {
            bail!("--vault-protocol {:?}: https or http", self.vault_protocol);
        }
        let auth = match &self.vault_kubernetes_role {
            Some(role) => VaultAuth::Kubernetes {
                mount: self.vault_kubernetes_mount.clone(),
                role: role.clone(),
                jwt_path: self.vault_kubernetes_token_file.clone(),
            },
            None => VaultAuth::Token(self.vault_token()?),
        };
        let ca_pem = (self.vault_ca_file.as_ref())
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("--vault-ca-file {}", path.display()))
            })
            .transpose()?;
        Ok(VaultConfig {
            address: format!("{}://{host}:{}", self.vault_protocol, self.vault_port),
            mount: self.vault_pki_mount.clone(),
            role: self.vault_role.clone(),
            auth,
            ca_pem,
            concurrency: self.vault_concurrency,
        })
    }

    fn vault_token(&self) -> Result<String> {
        let token = match &self.vault_token_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("--vault-token-file {}", path.display()))?,
            None => std::env::var("VAULT_TOKEN").context(
                "--certificate-manager vault needs a token: --vault-token-file, VAULT_TOKEN, or --vault-kubernetes-role",
            )?,
        };
        let token = token.trim();
        if token.is_empty() {
            bail!("the Vault token is empty");
        }
        Ok(token.to_owned())
    }
}
