//! AdmissionReview (admission.k8s.io/v1) as it travels: the request the
//! API server sends, and the response it expects back in the same
//! envelope.

use k8s_openapi::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The only AdmissionReview version served (the webhook configuration asks
/// for it alone).
pub(crate) const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// Why a body is not a review this webhook can answer. The API server never
/// sends one; the HTTP answer is 400 with this text.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not JSON, or not shaped like an AdmissionReview.
    #[error("the body is not an AdmissionReview: {0}")]
    Malformed(#[source] serde_json::Error),
    /// Another apiVersion or kind.
    #[error("expected {API_VERSION} {KIND}, got {api_version:?} {kind:?}")]
    Version {
        /// The body's apiVersion.
        api_version: String,
        /// The body's kind.
        kind: String,
    },
    /// An AdmissionReview with no `request` (or one with an empty uid).
    #[error("the AdmissionReview carries no request with a uid")]
    NoRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<Request>,
}

/// The group, version and kind of the reviewed object.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct Kind {
    #[serde(default)]
    pub(crate) group: String,
    #[serde(default)]
    pub(crate) version: String,
    #[serde(default)]
    pub(crate) kind: String,
}

/// What is being admitted.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Request {
    pub(crate) uid: String,
    #[serde(default)]
    pub(crate) kind: Kind,
    /// The object's namespace; a pod being created may not carry it yet.
    #[serde(default)]
    pub(crate) namespace: String,
    /// The object's name; empty for a pod named by `generateName`.
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) operation: String,
    #[serde(default)]
    pub(crate) object: Option<Value>,
    /// Side effects (the bootstrap Secret) must not happen on a dry run.
    #[serde(default)]
    pub(crate) dry_run: bool,
}

impl Request {
    /// Whether this is the creation of a core/v1 Pod.
    pub(crate) fn is_pod_creation(&self) -> bool {
        self.operation == "CREATE"
            && self.kind.group.is_empty()
            && self.kind.version == "v1"
            && self.kind.kind == "Pod"
    }
}

/// Reads a review's request.
pub(crate) fn parse(body: &[u8]) -> Result<Request, ReviewError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(ReviewError::Malformed)?;
    if envelope.api_version != API_VERSION || envelope.kind != KIND {
        return Err(ReviewError::Version {
            api_version: envelope.api_version,
            kind: envelope.kind,
        });
    }
    match envelope.request {
        Some(request) if !request.uid.is_empty() => Ok(request),
        _ => Err(ReviewError::NoRequest),
    }
}

/// The answer to one review.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Admitted unchanged; the reason is logged.
    Skip(String),
    /// Admitted with this RFC 6902 patch (a JSON array of operations).
    Patch(Value),
    /// Refused with this message, which the pod's creator sees.
    Deny(String),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Response<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// Go's encoding of `[]byte`: base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<ByteString>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

/// The AdmissionReview answering `uid`.
pub(crate) fn respond(uid: &str, verdict: &Verdict, warnings: &[String]) -> Value {
    let mut response = Response {
        uid,
        allowed: true,
        status: None,
        patch_type: None,
        patch: None,
        warnings,
    };
    match verdict {
        Verdict::Skip(_) => {}
        Verdict::Patch(ops) => {
            response.patch_type = Some("JSONPatch");
            response.patch = Some(ByteString(ops.to_string().into_bytes()));
        }
        Verdict::Deny(message) => {
            response.allowed = false;
            response.status = Some(json!({ "code": 403, "message": message }));
        }
    }
    json!({ "apiVersion": API_VERSION, "kind": KIND, "response": response })
}
