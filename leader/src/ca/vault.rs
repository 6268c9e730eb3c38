//! Leaves from a Vault PKI secrets engine (HashiCorp Vault or OpenBao), as
//! OSM's `vault` certificate manager issued them: `POST
//! /v1/<mount>/issue/<role>` for each leaf, the chains of the mount's
//! issuers as the mesh's trust bundle. Vault's own rotation (a new issuer,
//! made the default, the old one removed) is followed: the new issuer is
//! trusted as soon as it exists, every leaf is reissued once it signs, and
//! the old one is trusted until it is removed.
//!
//! Issuing is blocking HTTP: the compiler calls it on the blocking pool,
//! and a batch runs its requests concurrently. Vault being down or sealed
//! is [`CaError::Unavailable`] (the compiler keeps valid leaves and tries
//! again); Vault refusing (a role that does not allow the names, a denied
//! token) is [`CaError::Refused`] with Vault's own words.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use serde_json::{json, Value};
use tracing::{debug, info, warn};
use ureq::{
    tls::{parse_pem, PemItem, RootCerts, TlsConfig},
    Agent,
};

use super::{
    external_roots::ExternalRoots, leaf_not_after, signer_of, CaError, CertificateIssuer,
    IssuedCert, LeafRequest, SignerId,
};

const PROVIDER: &str = "vault";

/// How often the mount's CA chain is read again, to notice Vault's own
/// issuer rotation.
const CHAIN_REFRESH: Duration = Duration::from_secs(60);

/// How a Vault client authenticates.
#[derive(Clone, Debug)]
pub enum VaultAuth {
    /// A token, sent as it is.
    Token(String),
    /// Vault's Kubernetes auth method: a ServiceAccount token exchanged
    /// for a Vault token at `auth/<mount>/login` as `role`.
    Kubernetes {
        /// The auth method's mount path (`kubernetes`).
        mount: String,
        /// The Vault role the ServiceAccount logs in as.
        role: String,
        /// The ServiceAccount token's file, read at every login.
        jwt_path: PathBuf,
    },
}

/// Where and how to reach the PKI secrets engine.
#[derive(Clone, Debug)]
pub struct VaultConfig {
    /// Vault's address, `https://host:port` (`http://` is accepted with a
    /// warning: tokens and keys would cross the network in clear).
    pub address: String,
    /// The PKI secrets engine's mount path (`pki`).
    pub mount: String,
    /// The PKI role leaves are issued under.
    pub role: String,
    /// How to authenticate.
    pub auth: VaultAuth,
    /// Roots Vault's own certificate is verified with, PEM; without them,
    /// Mozilla's roots.
    pub ca_pem: Option<String>,
    /// How many requests a batch has in flight at once.
    pub concurrency: usize,
}

/// Issues leaves from Vault.
pub struct VaultIssuer {
    config: VaultConfig,
    agent: Agent,
    /// The Vault token in use (logged in for Kubernetes auth).
    token: Mutex<Option<String>>,
    roots: ExternalRoots,
}

impl std::fmt::Debug for VaultIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultIssuer")
            .field("address", &self.config.address)
            .field("mount", &self.config.mount)
            .field("role", &self.config.role)
            .finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> CaError {
    CaError::unavailable(PROVIDER, reason)
}

fn refused(reason: impl std::fmt::Display) -> CaError {
    CaError::refused(PROVIDER, reason)
}

/// Vault's `errors` in a reply, joined.
fn vault_errors(body: &Value) -> String {
    let errors: Vec<&str> = (body["errors"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    if errors.is_empty() {
        "no reason given".to_owned()
    } else {
        errors.join("; ")
    }
}

fn agent(ca_pem: Option<&str>) -> Result<Agent, CaError> {
    let mut tls = TlsConfig::builder();
    if let Some(pem) = ca_pem {
        let mut roots = Vec::new();
        for item in parse_pem(pem.as_bytes()) {
            match item.map_err(|e| refused(format!("--vault-ca-file: {e}")))? {
                PemItem::Certificate(cert) => roots.push(cert),
                _ => continue,
            }
        }
        if roots.is_empty() {
            return Err(refused("--vault-ca-file holds no certificate"));
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&roots));
    }
    Ok(Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .tls_config(tls.build())
        .build()
        .into())
}

impl VaultIssuer {
    /// A client of the engine `config` names; reads its CA chain now, so a
    /// wrong address, mount or credential is reported at start.
    pub fn connect(config: VaultConfig) -> Result<VaultIssuer, CaError> {
        if config.address.starts_with("http://") {
            warn!(address = %config.address, "Vault is reached over plain HTTP: its token and every leaf's private key cross the network in clear");
        }
        let agent = agent(config.ca_pem.as_deref())?;
        let issuer = VaultIssuer {
            config,
            agent,
            token: Mutex::new(None),
            roots: ExternalRoots::new(CHAIN_REFRESH),
        };
        let (bundle, named) = issuer.read_chain()?;
        info!(
            address = %issuer.config.address,
            mount = %issuer.config.mount,
            role = %issuer.config.role,
            roots = bundle.matches("BEGIN CERTIFICATE").count(),
            "issuing leaves from Vault"
        );
        issuer.roots.take(bundle, named, SystemTime::now());
        Ok(issuer)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.config.address.trim_end_matches('/'))
    }

    /// The Vault token to send, logging in first with Kubernetes auth.
    fn token(&self) -> Result<String, CaError> {
        let mut held = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = held.as_ref() {
            return Ok(token.clone());
        }
        let token = match &self.config.auth {
            VaultAuth::Token(token) => token.clone(),
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_path,
            } => {
                let jwt = std::fs::read_to_string(jwt_path).map_err(|e| {
                    refused(format!(
                        "reading the ServiceAccount token {}: {e}",
                        jwt_path.display()
                    ))
                })?;
                let body = json!({ "role": role, "jwt": jwt.trim() });
                let reply = self.call("POST", &format!("auth/{mount}/login"), None, Some(&body))?;
                (reply["auth"]["client_token"].as_str())
                    .ok_or_else(|| refused("the Kubernetes login answered no client_token"))?
                    .to_owned()
            }
        };
        *held = Some(token.clone());
        Ok(token)
    }

    /// One call; the reply's JSON body when Vault answered 2xx.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, CaError> {
        let url = self.url(path);
        let sent = match (method, body) {
            ("POST", Some(body)) => {
                let mut request = self.agent.post(&url);
                if let Some(token) = token {
                    request = request.header("X-Vault-Token", token);
                }
                request.send_json(body)
            }
            _ => {
                let mut request = self.agent.get(&url);
                if let Some(token) = token {
                    request = request.header("X-Vault-Token", token);
                }
                request.call()
            }
        };
        let mut reply = sent.map_err(|e| unavailable(format!("{url}: {e}")))?;
        let status = reply.status().as_u16();
        let body: Value = reply.body_mut().read_json().unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(body),
            // Sealed, standby without forwarding, or down behind a proxy.
            500..=599 => Err(unavailable(format!(
                "{url}: HTTP {status}: {}",
                vault_errors(&body)
            ))),
            _ => Err(refused(format!(
                "{url}: HTTP {status}: {}",
                vault_errors(&body)
            ))),
        }
    }

    /// A call made with the token, logging in again once if Vault no longer
    /// takes it (an expired Kubernetes login).
    fn authorized(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CaError> {
        let token = self.token()?;
        match self.call(method, path, Some(&token), body) {
            Err(CaError::Refused { reason, .. })
                if reason.contains("HTTP 403")
                    && matches!(self.config.auth, VaultAuth::Kubernetes { .. }) =>
            {
                debug!("Vault refused the token; logging in again");
                *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let token = self.token()?;
                self.call(method, path, Some(&token), body)
            }
            other => other,
        }
    }

    /// The mount's trust bundle, PEM: every issuer's chain (so a new
    /// issuer is trusted before it signs and an old one until it is
    /// removed), else, where issuers cannot be listed, the default
    /// issuer's chain.
    fn read_chain(&self) -> Result<(String, SignerId), CaError> {
        let mount = &self.config.mount;
        let default = self.call("GET", &format!("{mount}/cert/ca_chain"), None, None)?;
        let chain = default["data"]["certificate"]
            .as_str()
            .or_else(|| default["data"]["ca_chain"].as_str())
            .unwrap_or_default()
            .trim()
            .to_owned();
        if !chain.contains("BEGIN CERTIFICATE") {
            return Err(refused(format!(
                "mount {mount:?} has no CA: generate or import one (pki/root/generate/internal)"
            )));
        }
        let mut bundle: Vec<String> = Vec::new();
        let mut add = |pem: &str| {
            for cert in pem.split_inclusive("-----END CERTIFICATE-----") {
                let cert = cert.trim();
                if cert.contains("BEGIN CERTIFICATE") && !bundle.iter().any(|held| held == cert) {
                    bundle.push(cert.to_owned());
                }
            }
        };
        add(&chain);
        let listed = self.call("GET", &format!("{mount}/issuers?list=true"), None, None);
        let mut issuers: Vec<String> = match &listed {
            Ok(reply) => (reply["data"]["keys"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Err(error) => {
                debug!(%error, "cannot list the mount's issuers; trusting the default's chain");
                Vec::new()
            }
        };
        issuers.sort();
        for issuer in issuers {
            let reply = self.call("GET", &format!("{mount}/issuer/{issuer}/json"), None, None)?;
            for cert in (reply["data"]["ca_chain"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
            {
                add(cert);
            }
        }
        let bundle = bundle.into_iter().map(|cert| cert + "\n").collect();
        Ok((bundle, signer_of(&chain)))
    }
}

/// The leaf `reply` carries, its chain (leaf, then issuing chain) and key.
fn issued(reply: &Value, request: &LeafRequest) -> Result<IssuedCert, CaError> {
    let data = &reply["data"];
    let field = |name: &str| {
        (data[name].as_str()).map(str::to_owned).ok_or_else(|| {
            refused(format!(
                "the issue reply for {} has no {name}",
                request.common_name
            ))
        })
    };
    let certificate = field("certificate")?;
    let key_pem = field("private_key")?;
    let issuing_ca = field("issuing_ca")?;
    let chain: Vec<&str> = (data["ca_chain"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let chain = if chain.is_empty() {
        issuing_ca.clone()
    } else {
        chain.join("\n")
    };
    let now = SystemTime::now();
    let not_after = leaf_not_after(&certificate, now)
        .map_err(|reason| refused(format!("the leaf for {}: {reason}", request.common_name)))?;
    Ok(IssuedCert {
        chain_pem: format!("{}\n{}\n", certificate.trim(), chain.trim()),
        key_pem: format!("{}\n", key_pem.trim()),
        issued_at: now,
        not_after,
        signer: signer_of(&issuing_ca),
    })
}

impl CertificateIssuer for VaultIssuer {
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        let join = |names: Vec<String>| names.join(",");
        let body = json!({
            "common_name": request.common_name,
            "alt_names": join(request.dns_names.clone()),
            "uri_sans": join(request.uris.clone()),
            "ip_sans": join(request.ip_addresses.iter().map(ToString::to_string).collect()),
            "ttl": format!("{}s", request.validity.as_secs().max(1)),
            "format": "pem",
            "private_key_format": "pkcs8",
        });
        let path = format!("{}/issue/{}", self.config.mount, self.config.role);
        let reply = self.authorized("POST", &path, Some(&body))?;
        let cert = issued(&reply, request)?;
        // The role's issuer signs, which may not be the mount's default.
        self.roots.signed_by(cert.signer);
        Ok(cert)
    }

    fn issue_batch(&self, requests: &[LeafRequest]) -> Vec<Result<IssuedCert, CaError>> {
        let next = AtomicUsize::new(0);
        let results: Vec<Mutex<Option<Result<IssuedCert, CaError>>>> =
            requests.iter().map(|_| Mutex::new(None)).collect();
        let workers = self.config.concurrency.clamp(1, requests.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let at = next.fetch_add(1, Ordering::Relaxed);
                    let Some(request) = requests.get(at) else {
                        break;
                    };
                    let result = self.issue(request);
                    if let Some(slot) = results.get(at) {
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|slot| {
                (slot.into_inner().unwrap_or_else(|e| e.into_inner()))
                    .unwrap_or_else(|| Err(unavailable("the request was not made")))
            })
            .collect()
    }

    fn trust_bundle(&self) -> Arc<str> {
        self.roots.bundle()
    }

    fn signer(&self) -> SignerId {
        self.roots.signer()
    }

    /// Reads the mount's issuers again now and then: a new issuer is
    /// trusted at once; a new default issuer is a new signer, and the
    /// compiler reissues every leaf.
    fn advance(&self, now: SystemTime, _leaves_current: bool) -> Result<bool, CaError> {
        if !self.roots.due(now) {
            return Ok(false);
        }
        match self.read_chain() {
            Ok((bundle, named)) => Ok(self.roots.take(bundle, named, now)),
            // Unreachable: the chain held stays in use.
            Err(error) => {
                debug!(%error, "could not read Vault's CA chain; keeping the one held");
                Ok(false)
            }
        }
    }
}
