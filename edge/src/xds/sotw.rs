//! State of the world (`StreamAggregatedResources`): turns one request into
//! subscription changes and the response they call for.
//!
//! Rules implemented here (xDS protocol, "State of the world"):
//! * A request whose nonce is not the latest sent for its type is stale and
//!   ignored.
//! * `resource_names` is the whole subscription; an empty list for LDS/CDS
//!   (or `*`) is a wildcard subscription.
//! * LDS and CDS responses carry every subscribed resource; RDS and EDS
//!   responses carry the resources that changed or were newly asked for.
//! * `version_info` is a content digest of what the client holds, so a client
//!   reconnecting with the digest of the current state is sent nothing.

use std::{collections::HashSet, sync::Arc};

use trellis_proto::pb::envoy::service::discovery::v3::DiscoveryRequest;
use trellis_shared::{type_url, Epoch, Snapshot};

use super::{
    response::{self, ResponseCache},
    state::{Candidates, NonceCheck, StreamState, TypeUpdate},
    Encoded, Refusal, RequestOutcome,
};
use crate::metrics::Protocol;

const WILDCARD: &str = "*";

/// State of the world over `StreamAggregatedResources`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sotw;

impl super::Variant for Sotw {
    type Request = DiscoveryRequest;
    const PROTOCOL: Protocol = Protocol::Sotw;

    fn node(request: &Self::Request) -> Option<&trellis_proto::pb::envoy::config::core::v3::Node> {
        request.node.as_ref()
    }

    fn type_url(request: &Self::Request) -> &str {
        &request.type_url
    }

    fn subscribed(request: &Self::Request) -> &[String] {
        &request.resource_names
    }

    fn on_request(
        state: &mut StreamState,
        request: Self::Request,
    ) -> Result<RequestOutcome, Refusal> {
        on_request(state, request)
    }

    fn encode(
        state: &StreamState,
        update: &TypeUpdate,
        before: &Snapshot,
        cache: &ResponseCache,
        epoch: Epoch,
    ) -> Option<Encoded> {
        let types = state.get(&update.type_url)?;
        let version = types.digest();
        let type_url = &*update.type_url;
        if type_url::supports_wildcard(type_url) {
            // Full state: everything held, plus removals deferred to a later
            // response (make-before-break).
            let before = before.class(&state.class);
            let holding = response::full_state(
                update.holding.iter().cloned(),
                type_url,
                state.view(),
                before,
            );
            let key = response::sotw_key(type_url, version, &holding);
            let (body, cached) = cache.get_or_encode(epoch, key, || {
                let names = types
                    .sent()
                    .keys()
                    .cloned()
                    .chain(update.holding.iter().cloned());
                let resources = response::full_state(names, type_url, state.view(), before);
                response::sotw_body(type_url, version, &resources)
            });
            return Some(Encoded {
                body,
                cached,
                resources: types.sent().len() + update.holding.len(),
            });
        }
        if update.resources.is_empty() && !update.respond_empty {
            // SotW cannot say "removed" for RDS/EDS; the client drops them
            // when nothing refers to them any more.
            return None;
        }
        let key = response::sotw_key(type_url, version, &update.resources);
        let (body, cached) = cache.get_or_encode(epoch, key, || {
            response::sotw_body(type_url, version, &update.resources)
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
    request: DiscoveryRequest,
) -> Result<RequestOutcome, Refusal> {
    let limits = *state.limits();
    if request
        .resource_names
        .iter()
        .any(|n| n.len() > limits.max_name_len)
    {
        return Err(Refusal::NameTooLong);
    }
    let (view, type_url, types) = state.view_and_type(&request.type_url)?;
    let error = request.error_detail.as_ref().map(|s| s.message.as_str());
    let nonce = StreamState::check_nonce(types, &request.response_nonce, error);
    let mut update = TypeUpdate::new(type_url.clone());
    if nonce == NonceCheck::Stale {
        return Ok(RequestOutcome { nonce, update });
    }

    let names: HashSet<Arc<str>> = request
        .resource_names
        .iter()
        .filter(|n| *n != WILDCARD)
        .map(|n| Arc::from(n.as_str()))
        .collect();
    if names.len() > limits.max_names {
        return Err(Refusal::TooManyNames);
    }
    let wildcard = request.resource_names.iter().any(|n| n == WILDCARD)
        || (request.resource_names.is_empty() && type_url::supports_wildcard(&type_url));
    let added: Vec<Arc<str>> = names.difference(&types.names).cloned().collect();
    let wildcard_added = wildcard && !types.wildcard;
    types.wildcard = wildcard;
    types.names = names;
    types.forget_unwanted();

    let first = !types.requested;
    types.requested = true;
    let mut candidates = if first || wildcard_added {
        types.candidates(view, &type_url)
    } else {
        Candidates::new()
    };
    if first {
        // A reconnecting client reports the digest of what it holds; if that
        // is the current state, it needs nothing.
        let current = types.desired_digest(view, &type_url);
        if !request.version_info.is_empty() && request.version_info == format!("{current:016x}") {
            types.reconcile_each(
                candidates,
                view,
                &type_url,
                &mut TypeUpdate::new(type_url.clone()),
            );
            return Ok(RequestOutcome { nonce, update });
        }
        update.respond_empty = type_url::supports_wildcard(&type_url);
    }
    let adds_names = !added.is_empty();
    for name in added {
        candidates.insert(name, true);
    }
    types.reconcile_each(candidates, view, &type_url, &mut update);
    if adds_names {
        state.check_name_bytes()?;
    }
    Ok(RequestOutcome { nonce, update })
}
