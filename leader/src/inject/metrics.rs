//! The injector's figures: reviews answered, by outcome, and how long each
//! took (the API server waits at most the webhook's timeout).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Upper bounds of the review-time histogram's buckets, in seconds: most
/// reviews sign one certificate and create one Secret.
const REVIEW_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What became of a review.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The pod was patched with the sidecar.
    Injected,
    /// Allowed unchanged (not in the mesh, injection disabled, not a pod
    /// creation, already injected).
    Skipped,
    /// Refused, with the reason.
    Denied,
    /// The body was not a review.
    Invalid,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Counted on every review; served on the injector's admin endpoint.
#[derive(Debug)]
pub struct InjectorMetrics {
    reviews: Family<OutcomeLabels, Counter>,
    review_seconds: Histogram,
}

impl Default for InjectorMetrics {
    fn default() -> Self {
        InjectorMetrics {
            reviews: Family::default(),
            review_seconds: Histogram::new(REVIEW_BUCKETS),
        }
    }
}

impl InjectorMetrics {
    /// Registers every figure under the `trellis_injector` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let injector = registry.sub_registry_with_prefix("trellis_injector");
        injector.register(
            "reviews",
            "Admission reviews answered, by outcome (injected, skipped, denied, invalid)",
            self.reviews.clone(),
        );
        injector.register(
            "review_seconds",
            "Seconds each review took to answer",
            self.review_seconds.clone(),
        );
    }

    pub(crate) fn record(&self, outcome: Outcome, seconds: f64) {
        let outcome = match outcome {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        };
        self.reviews.get_or_create(&OutcomeLabels { outcome }).inc();
        self.review_seconds.observe(seconds);
    }
}
