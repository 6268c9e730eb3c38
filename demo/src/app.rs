//! The applications in the pods, as small as the demo needs: an HTTP
//! server that says which pod answered and who its sidecar says called
//! (and misbehaves on request: `/fail-first/<n>/<key>` answers 503 to the
//! first `n` requests with that key, then 200; `/slow/<ms>` answers after
//! `ms` milliseconds), a
//! TCP server (mysql's stand-in) that greets and echoes, and the clients
//! the tests and a person use from inside a pod. `trellis-demo serve`,
//! `get` and `tcp` run them.
//!
//! A client opens a new connection per request, as a fresh curl would, so
//! every request meets the sidecar's current configuration.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{header, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

/// The header a sidecar's inbound listener sets from the caller's
/// certificate.
pub const XFCC: &str = "x-forwarded-client-cert";

/// What the HTTP server answers, as JSON: which pod answered, what it was
/// asked, and the caller's certificate details its sidecar forwarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// `<ns>/<pod>` of the server.
    pub pod: String,
    /// The request's method.
    pub method: String,
    /// The request's path and query.
    pub path: String,
    /// `x-forwarded-client-cert` as received, if any.
    pub xfcc: Option<String>,
}

/// An HTTP response as a client received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers, by lowercase name (the last of repeated ones).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body, as text.
    pub body: String,
}

impl Reply {
    /// The body as the demo server's [`Answer`], if it is one.
    pub fn answer(&self) -> Option<Answer> {
        serde_json::from_str(&self.body).ok()
    }
}

/// What a TCP client got from the server: its greeting (the pod's name)
/// and the echo of the line sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpReply {
    /// The server's first line.
    pub greeting: String,
    /// What came back for the line sent.
    pub echo: String,
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The URL is not `http://host[:port]/path`.
    #[error("bad URL {0:?}")]
    Url(String),
    /// Connecting, reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The server closed the connection before answering.
    #[error("the connection closed {0}")]
    Closed(&'static str),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Serves HTTP on `listener` until it fails, answering every request with
/// an [`Answer`] from `pod`.
pub async fn serve_http(listener: TcpListener, pod: String) -> std::io::Result<()> {
    let pod: Arc<str> = pod.into();
    let failures = Failures::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let (pod, failures) = (pod.clone(), failures.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let mut answer = answer(&pod, &request);
                if failures.fails(request.uri().path()) {
                    *answer.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                let delay = (request.uri().path().strip_prefix("/slow/"))
                    .and_then(|ms| ms.parse().ok())
                    .map(Duration::from_millis);
                async move {
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(answer)
                }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(%error, "HTTP connection ended");
            }
        });
    }
}

/// How many requests of each `/fail-first/<n>/<key>` came.
#[derive(Clone, Default)]
struct Failures(Arc<Mutex<HashMap<String, u64>>>);

impl Failures {
    /// Whether the request for `path` fails: the first `n` of its key do.
    fn fails(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix("/fail-first/") else {
            return false;
        };
        let Some((n, key)) = rest.split_once('/') else {
            return false;
        };
        let Ok(n) = n.parse::<u64>() else {
            return false;
        };
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = seen.entry(key.to_owned()).or_default();
        *count += 1;
        *count <= n
    }
}

fn answer(pod: &str, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let answer = Answer {
        pod: pod.to_owned(),
        method: request.method().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map_or("/".to_owned(), ToString::to_string),
        xfcc: request
            .headers()
            .get(XFCC)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    };
    let mut body = serde_json::to_string(&answer).unwrap_or_default();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves TCP on `listener` until it fails: each connection is greeted
/// with `pod` and a newline (a server-first protocol, as mysql's is), then
/// everything it sends is echoed.
pub async fn serve_tcp(listener: TcpListener, pod: String) -> std::io::Result<()> {
    let greeting: Arc<str> = format!("{pod}\n").into();
    loop {
        let (stream, _) = listener.accept().await?;
        let greeting = greeting.clone();
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.into_split();
            let echoed = async {
                writer.write_all(greeting.as_bytes()).await?;
                tokio::io::copy(&mut reader, &mut writer).await
            };
            if let Err(error) = echoed.await {
                debug!(%error, "TCP connection ended");
            }
        });
    }
}

/// One HTTP/1.1 request to `url` on a new connection, the Host header
/// being the URL's authority (what a sidecar's virtual hosts match).
pub async fn request(method: Method, url: &str, timeout: Duration) -> Result<Reply, AppError> {
    tokio::time::timeout(timeout, request_now(method, url))
        .await
        .map_err(|_| AppError::Timeout(timeout))?
}

async fn request_now(method: Method, url: &str) -> Result<Reply, AppError> {
    let uri: Uri = url.parse().map_err(|_| AppError::Url(url.to_owned()))?;
    let authority = uri
        .authority()
        .filter(|_| uri.scheme_str() == Some("http"))
        .ok_or_else(|| AppError::Url(url.to_owned()))?
        .clone();
    let stream = TcpStream::connect((authority.host(), authority.port_u16().unwrap_or(80))).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|_| AppError::Url(url.to_owned()))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let headers = (response.headers().iter())
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Connects to `address` (`host:port`), reads the greeting, sends `line`
/// and reads its echo.
pub async fn exchange(address: &str, line: &str, timeout: Duration) -> Result<TcpReply, AppError> {
    tokio::time::timeout(timeout, exchange_now(address, line))
        .await
        .map_err(|_| AppError::Timeout(timeout))?
}

async fn exchange_now(address: &str, line: &str) -> Result<TcpReply, AppError> {
    let mut stream = BufReader::new(TcpStream::connect(address).await?);
    let mut greeting = String::new();
    if stream.read_line(&mut greeting).await? == 0 {
        return Err(AppError::Closed("before the greeting"));
    }
    stream
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await?;
    let mut echo = String::new();
    if stream.read_line(&mut echo).await? == 0 {
        return Err(AppError::Closed("before the echo"));
    }
    Ok(TcpReply {
        greeting: greeting.trim_end().to_owned(),
        echo: echo.trim_end().to_owned(),
    })
}

/// How `trellis-demo get` and `tcp` print one attempt: a JSON line,
/// `{"Ok": …}` or `{"Err": "why"}`.
pub fn attempt_line<T: Serialize>(attempt: Result<T, AppError>) -> String {
    let attempt = attempt.map_err(|error| error.to_string());
    serde_json::to_string(&attempt).unwrap_or_default()
}

/// Reads a line [`attempt_line`] printed; `None` if it is not one.
pub fn parse_attempt<T: for<'de> Deserialize<'de>>(line: &str) -> Option<Result<T, String>> {
    serde_json::from_str(line).ok()
}

/// Whether a line `trellis-demo get` printed is a 200 reply.
pub fn succeeded(line: &str) -> bool {
    parse_attempt::<Reply>(line).is_some_and(|attempt| attempt.is_ok_and(|r| r.status == 200))
}
