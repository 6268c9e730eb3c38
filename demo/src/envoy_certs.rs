//! What a pod's Envoy holds, from its admin `/certs`: the leaves it
//! presents and the roots it trusts for mesh traffic, by serial number.

use std::collections::BTreeSet;

use crate::Pod;

/// The serial numbers of the leaf certificates a pod's Envoy holds: its
/// bootstrap certificate (xDS) and its service certificate.
pub async fn leaf_serials(pod: &Pod) -> BTreeSet<String> {
    (contexts(pod).await.iter())
        .filter_map(|c| c["cert_chain"][0]["serial_number"].as_str())
        .map(str::to_owned)
        .collect()
}

/// The roots a pod's Envoy trusts for mesh traffic (every TLS context but
/// the bootstrap certificate's, whose name says `.sidecar.`).
pub async fn mesh_trust(pod: &Pod) -> BTreeSet<String> {
    (contexts(pod).await.iter())
        .filter(|c| !c["cert_chain"].to_string().contains(".sidecar."))
        .flat_map(|c| c["ca_cert"].as_array().cloned().unwrap_or_default())
        .filter_map(|ca| ca["serial_number"].as_str().map(str::to_owned))
        .collect()
}

/// The TLS contexts of a pod's Envoy.
async fn contexts(pod: &Pod) -> Vec<serde_json::Value> {
    let text = pod
        .get("http://127.0.0.1:15000/certs")
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    json["certificates"].as_array().cloned().unwrap_or_default()
}

/// The serial numbers of the certificates in `pem`, as Envoy prints them.
pub fn serials_of(pem: &str) -> BTreeSet<String> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter_map(|pem| {
            let cert = pem.parse_x509().ok()?;
            Some(
                cert.raw_serial()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            )
        })
        .collect()
}

/// The roots a pod's Envoy is configured to trust for mesh traffic now:
/// the trusted CAs of the validation secrets SDS gave it, by serial.
/// Unlike [`mesh_trust`], a connection opened before a change does not keep
/// the roots it was opened with in view.
pub async fn configured_trust(pod: &Pod) -> BTreeSet<String> {
    let text = pod
        .get("http://127.0.0.1:15000/config_dump?resource=dynamic_active_secrets")
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut roots = BTreeSet::new();
    trusted_cas(&json, &mut roots);
    roots
}

fn trusted_cas(value: &serde_json::Value, roots: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(pem) = map
                .get("trusted_ca")
                .and_then(|ca| ca["inline_string"].as_str())
            {
                roots.extend(serials_of(pem));
            }
            map.values().for_each(|child| trusted_cas(child, roots));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|child| trusted_cas(child, roots)),
        _ => {}
    }
}
