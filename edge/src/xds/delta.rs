//! Incremental xDS (`DeltaAggregatedResources`): turns one request into
//! subscription changes and the response they call for.
//!
//! Rules implemented here (xDS protocol, "Incremental xDS"):
//! * `initial_resource_versions` is honoured on the first request of a type
//!   only: the client is not sent what it already holds.
//! * A first LDS/CDS request with no names is a legacy wildcard
//!   subscription; `*` subscribes to the wildcard explicitly.
//! * Every name in `resource_names_subscribe` is answered, with the resource
//!   or in `removed_resources` if it does not exist.
//! * Unsubscribing forgets what was sent, so a later subscribe re-sends.

use std::sync::Arc;

use trellis_proto::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use trellis_shared::{type_url, Epoch, Snapshot, Version};

use super::{
    response::{self, ResponseCache},
    state::{Candidates, StreamState, TypeUpdate},
    Encoded, Refusal, RequestOutcome,
};
use crate::metrics::Protocol;

const WILDCARD: &str = "*";

/// Incremental xDS over `DeltaAggregatedResources`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delta;

impl super::Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    const PROTOCOL: Protocol = Protocol::Delta;

    fn node(request: &Self::Request) -> Option<&trellis_proto::pb::envoy::config::core::v3::Node> {
        request.node.as_ref()
    }

    fn type_url(request: &Self::Request) -> &str {
        &request.type_url
    }

    fn subscribed(request: &Self::Request) -> &[String] {
        &request.resource_names_subscribe
    }

    fn on_request(
        state: &mut StreamState,
        request: Self::Request,
    ) -> Result<RequestOutcome, Refusal> {
        on_request(state, request)
    }

    fn encode(
        _state: &StreamState,
        update: &TypeUpdate,
        _before: &Snapshot,
        cache: &ResponseCache,
        epoch: Epoch,
    ) -> Option<Encoded> {
        let (body, cached) = cache.get_or_encode(epoch, response::delta_key(update), || {
            response::delta_body(update)
        });
        Some(Encoded {
            body,
            cached,
            resources: update.resources.len(),
        })
    }
}

fn on_request(
    state: &mut StreamState,
    request: DeltaDiscoveryRequest,
) -> Result<RequestOutcome, Refusal> {
    let limits = *state.limits();
    if request.initial_resource_versions.len() > limits.max_names {
        return Err(Refusal::TooManyNames);
    }
    let adds_names = !request.resource_names_subscribe.is_empty()
        || !request.initial_resource_versions.is_empty();
    let names = request
        .resource_names_subscribe
        .iter()
        .chain(&request.resource_names_unsubscribe)
        .chain(request.initial_resource_versions.keys());
    for name in names {
        if name.len() > limits.max_name_len {
            return Err(Refusal::NameTooLong);
        }
    }
    let (view, type_url, types) = state.view_and_type(&request.type_url)?;
    let error = request.error_detail.as_ref().map(|s| s.message.as_str());
    let nonce = StreamState::check_nonce(types, &request.response_nonce, error);

    let first = !types.requested;
    types.requested = true;
    let mut update = TypeUpdate::new(type_url.clone());
    if first {
        for (name, version) in &request.initial_resource_versions {
            // A version we cannot read is one we never sent: keep the name
            // (the client holds something) under a version nothing matches.
            let version = Version::parse(version).unwrap_or(Version(u64::MAX));
            types.hold(Arc::from(name.as_str()), version);
        }
        if request.resource_names_subscribe.is_empty() && type_url::supports_wildcard(&type_url) {
            types.wildcard = true;
        }
    }

    let mut forced = Vec::new();
    let mut wildcard_added = false;
    for name in &request.resource_names_subscribe {
        if name == WILDCARD {
            wildcard_added |= !types.wildcard;
            types.wildcard = true;
        } else {
            let name: Arc<str> = Arc::from(name.as_str());
            if !types.names.contains(&name) && types.names.len() >= limits.max_names {
                return Err(Refusal::TooManyNames);
            }
            types.names.insert(name.clone());
            forced.push(name);
        }
    }
    for name in &request.resource_names_unsubscribe {
        if name == WILDCARD {
            types.wildcard = false;
            types.forget_unwanted();
        } else {
            types.names.remove(name.as_str());
            if !types.interested(name) {
                types.forget(name);
            }
        }
    }

    let mut candidates = if first || wildcard_added {
        types.candidates(view, &type_url)
    } else {
        Candidates::new()
    };
    for name in forced {
        // On the first request, a name the client declared with the current
        // version is not re-sent: that is what initial_resource_versions is for.
        let current = view.get(&type_url, &name).map(|r| r.version());
        let declared = request
            .initial_resource_versions
            .get(&*name)
            .and_then(|v| Version::parse(v));
        let held = first && current.is_some() && declared == current;
        candidates.insert(name, !held);
    }
    types.reconcile_each(candidates, view, &type_url, &mut update);
    // A fresh client's wildcard fetch is answered even when empty, to
    // complete its initialisation; a reconnecting client (it declares what
    // it holds) is already initialised, and an empty answer would count as a
    // configuration update.
    update.respond_empty = first && types.wildcard && request.initial_resource_versions.is_empty();
    if adds_names {
        state.check_name_bytes()?;
    }
    Ok(RequestOutcome { nonce, update })
}
