//! What an edge serves one proxy, for `trellis proxy-config`: every
//! resource of its class in the snapshot being served, as JSON (Envoy's
//! protobuf JSON mapping, through the descriptors the edge already holds),
//! read from the snapshot, not from Envoy. Secrets are named and versioned,
//! never shown: they hold private keys.

use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde_json::{json, Value};
use trellis_proto::pb::google::protobuf::Any;
use trellis_shared::{type_url, Resource, Snapshot};

use crate::xds::StreamReport;

/// The types a proxy is sent, in the order Envoy applies them.
const TYPES: [&str; 5] = [
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
    type_url::SECRET,
];

/// The configuration of each stream whose node id or pod is `proxy`.
pub(crate) fn of(snapshot: &Snapshot, streams: &[StreamReport], proxy: &str) -> Vec<Value> {
    streams
        .iter()
        .filter(|s| s.node == proxy || s.pod.as_deref() == Some(proxy))
        .map(|stream| {
            let view = snapshot.class(&stream.class);
            let mut resources = serde_json::Map::new();
            for type_url in TYPES {
                let listed: Vec<Value> = view
                    .iter(type_url)
                    .map(|(name, resource)| {
                        json!({
                            "name": name.as_ref(),
                            "version": resource.version().to_string(),
                            "resource": shown(type_url, resource),
                        })
                    })
                    .collect();
                if !listed.is_empty() {
                    resources.insert(type_url::short_name(type_url).to_owned(), listed.into());
                }
            }
            json!({
                "node": stream.node,
                "pod": stream.pod,
                "class": stream.class,
                "resources": resources,
            })
        })
        .collect()
}

/// `resource` as JSON; a secret as a note, never its keys.
fn shown(type_url: &str, resource: &Resource) -> Value {
    if type_url == type_url::SECRET {
        return json!("(secrets are not shown)");
    }
    let Ok(any) = Any::decode(resource.any().clone()) else {
        return json!("(does not decode)");
    };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let Some(descriptor) = trellis_proto::descriptors().get_message_by_name(name) else {
        return json!(format!("({name}: no descriptor)"));
    };
    let Ok(message) = DynamicMessage::decode(descriptor, any.value.as_slice()) else {
        return json!("(does not decode)");
    };
    let options = SerializeOptions::new().skip_default_fields(true);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap_or_else(|error| json!(format!("(does not render: {error})")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use trellis_proto::pb::envoy::{
        config::cluster::v3::Cluster,
        extensions::transport_sockets::tls::v3::{secret, Secret, TlsCertificate},
    };
    use trellis_shared::{ClassManifest, Scope};

    use super::*;
    use crate::{metrics::Protocol, xds::StreamReport};

    #[test]
    fn a_proxys_resources_are_shown_and_its_secrets_only_named() {
        let class = Scope::Class("c".into());
        let cluster = Cluster {
            name: "backend".to_owned(),
            ..Cluster::default()
        };
        let secret = Secret {
            name: "service-cert".to_owned(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate::default())),
        };
        let mut builder = Snapshot::empty().to_builder();
        let mut manifest = ClassManifest::default();
        for (type_url, name, resource) in [
            (
                type_url::CLUSTER,
                "backend",
                Resource::encode(type_url::CLUSTER, &cluster),
            ),
            (
                type_url::SECRET,
                "service-cert",
                Resource::encode(type_url::SECRET, &secret),
            ),
        ] {
            builder
                .insert(class.clone(), type_url, name, resource.unwrap())
                .unwrap();
            manifest.insert(class.clone(), type_url, name).unwrap();
        }
        builder
            .insert(
                class,
                type_url::PROXY_CLASS,
                "c",
                manifest.to_resource().unwrap(),
            )
            .unwrap();
        let snapshot = builder.build().unwrap();
        let stream = StreamReport {
            id: 1,
            node: "node-1".to_owned(),
            class: "c".to_owned(),
            protocol: Protocol::Delta,
            types: Vec::new(),
            unanswered_since: None,
            pod: Some("ns/pod-1".to_owned()),
        };
        let shown = of(&snapshot, &[stream], "ns/pod-1");
        assert_eq!(shown.len(), 1);
        assert_eq!(
            shown[0]["resources"]["cds"][0]["resource"]["name"],
            "backend"
        );
        let secret = &shown[0]["resources"]["sds"][0];
        assert_eq!(secret["name"], "service-cert");
        assert_eq!(secret["resource"], "(secrets are not shown)");
        assert!(of(&snapshot, &[], "ns/pod-1").is_empty());
    }
}
