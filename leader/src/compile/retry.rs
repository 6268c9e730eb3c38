//! Retry policies on a source's outbound routes (OSM-SEMANTICS, "Retry"):
//! the Envoy retry policy a Retry asks for, field for field; what it leaves
//! unset keeps Envoy's default.

use trellis_proto::pb::{
    envoy::config::route::v3::{retry_policy::RetryBackOff, RetryPolicy},
    google::protobuf::UInt32Value,
};

use super::envoy::duration;
use crate::catalog::RetryRule;

/// The route's retry policy for `rule`.
pub(crate) fn policy(rule: &RetryRule) -> RetryPolicy {
    RetryPolicy {
        retry_on: rule.retry_on.clone(),
        num_retries: rule.num_retries.map(|value| UInt32Value { value }),
        per_try_timeout: rule.per_try_timeout.map(duration),
        retry_back_off: rule.backoff_base_interval.map(|base| RetryBackOff {
            base_interval: Some(duration(base)),
            ..Default::default()
        }),
        ..Default::default()
    }
}
