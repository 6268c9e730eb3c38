//! Several harness processes. A process may hold 20,000 open files here, so
//! a run above that spreads its clients over workers: the coordinator (the
//! process the user started) starts `trellis-loadtest worker` children,
//! hands each its [`Share`] as one JSON line on stdin, then the ready edges
//! whenever they change, and reads their events back as JSON lines on
//! their stdout. The coordinator alone makes changes and measures.

use std::{path::PathBuf, process::Stdio};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
    task::JoinHandle,
};
use trellis_leader::ca::{BuiltinCa, CertificateIssuer};

use crate::{
    clients::{self, Endpoints, Share},
    envoy::Event,
};

/// What one worker is asked to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Assignment {
    /// Its clients.
    pub share: Share,
    /// The CA's directory when the clients speak mTLS: the worker issues its
    /// clients' certificates from it.
    pub ca_dir: Option<PathBuf>,
}

/// One line a worker writes.
#[derive(Debug, Serialize, Deserialize)]
enum Line {
    /// Every connection of the share is open and its clients started.
    Started,
    /// The share could not be started.
    Failed(String),
    /// A client's event.
    Event(Event),
}

/// Why workers could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A worker process could not be started or talked to.
    #[error("worker {index}: {source}")]
    Io {
        /// Which worker.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A worker could not start its share.
    #[error("worker {index}: {reason}")]
    Failed {
        /// Which worker.
        index: usize,
        /// What it said.
        reason: String,
    },
    /// The assignment did not parse (in the worker).
    #[error("reading the assignment: {0}")]
    Assignment(String),
}

/// Running workers; killed when dropped.
#[derive(Debug)]
pub struct Workers {
    children: Vec<Child>,
    inputs: Vec<ChildStdin>,
    readers: Vec<JoinHandle<()>>,
}

impl Workers {
    /// PIDs of the worker processes.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// Tells every worker which edges are ready now.
    pub async fn set_ready(&mut self, ready: &[usize]) -> Result<(), WorkerError> {
        let mut line =
            serde_json::to_string(ready).map_err(|e| WorkerError::Assignment(e.to_string()))?;
        line.push('\n');
        for (index, input) in self.inputs.iter_mut().enumerate() {
            let io = |source| WorkerError::Io { index, source };
            input.write_all(line.as_bytes()).await.map_err(io)?;
            input.flush().await.map_err(io)?;
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Starts one worker per assignment from the executable `harness`, and
/// returns once every one has started its share; their events go to
/// `events`.
pub async fn spawn(
    harness: &std::path::Path,
    assignments: Vec<Assignment>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Workers, WorkerError> {
    let mut children = Vec::new();
    let mut inputs = Vec::new();
    let mut readers = Vec::new();
    let mut started = Vec::new();
    for (index, assignment) in assignments.into_iter().enumerate() {
        let io = |source| WorkerError::Io { index, source };
        let mut child = Command::new(harness)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(io)?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(io(std::io::Error::other("no pipes to the worker")));
        };
        let mut text = serde_json::to_string(&assignment)
            .map_err(|e| WorkerError::Assignment(e.to_string()))?;
        text.push('\n');
        stdin.write_all(text.as_bytes()).await.map_err(io)?;
        inputs.push(stdin);
        let (ready, ready_rx) = tokio::sync::oneshot::channel();
        let events = events.clone();
        readers.push(tokio::spawn(read_lines(stdout, ready, events)));
        started.push((index, ready_rx));
        children.push(child);
    }
    for (index, ready) in started {
        match ready.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(WorkerError::Failed { index, reason }),
            Err(_) => {
                return Err(WorkerError::Failed {
                    index,
                    reason: "exited before starting its clients".to_owned(),
                })
            }
        }
    }
    Ok(Workers {
        children,
        inputs,
        readers,
    })
}

/// Forwards a worker's events; says once whether it started.
async fn read_lines(
    stdout: impl AsyncRead + Unpin,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut ready = Some(ready);
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Line>(&line) {
            Ok(Line::Event(event)) => {
                let _ = events.send(event);
            }
            Ok(Line::Started) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
            Ok(Line::Failed(reason)) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(reason));
                }
            }
            Err(error) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(format!("unreadable line {line:?}: {error}")));
                }
            }
        }
    }
}

/// The worker's side: reads its assignment from `input`, starts the share
/// and writes its events to `output` until the coordinator kills it; each
/// later line of `input` is the ready edges.
pub async fn serve(
    input: impl AsyncRead + Unpin + Send + 'static,
    output: impl AsyncWrite + Unpin,
) -> Result<(), WorkerError> {
    let mut line = String::new();
    let mut input = BufReader::new(input);
    input
        .read_line(&mut line)
        .await
        .map_err(|e| WorkerError::Assignment(e.to_string()))?;
    let assignment: Assignment =
        serde_json::from_str(&line).map_err(|e| WorkerError::Assignment(e.to_string()))?;
    let mut out = BufWriter::new(output);
    let io = |source| WorkerError::Io { index: 0, source };
    let issuer = match &assignment.ca_dir {
        Some(dir) => match BuiltinCa::open(dir) {
            Ok(ca) => Some(ca),
            Err(error) => return write_failed(&mut out, error.to_string()).await,
        },
        None => None,
    };
    let (events, mut received) = mpsc::unbounded_channel();
    let issuer = issuer.as_ref().map(|ca| ca as &dyn CertificateIssuer);
    let endpoints = Endpoints::new(assignment.share.ready.clone());
    let following = endpoints.clone();
    let _updates = tokio::spawn(async move {
        let mut lines = input.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(ready) = serde_json::from_str::<Vec<usize>>(&line) {
                following.set(ready);
            }
        }
    });
    let _clients = match clients::start(&assignment.share, issuer, &endpoints, events).await {
        Ok(clients) => clients,
        Err(error) => return write_failed(&mut out, error.to_string()).await,
    };
    write_line(&mut out, &Line::Started).await.map_err(io)?;
    out.flush().await.map_err(io)?;
    while let Some(event) = received.recv().await {
        write_line(&mut out, &Line::Event(event))
            .await
            .map_err(io)?;
        // Flush when caught up, so bursts go out in few writes.
        if received.is_empty() {
            out.flush().await.map_err(io)?;
        }
    }
    Ok(())
}

async fn write_line(out: &mut (impl AsyncWrite + Unpin), line: &Line) -> std::io::Result<()> {
    let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes()).await
}

async fn write_failed(
    out: &mut (impl AsyncWrite + Unpin),
    reason: String,
) -> Result<(), WorkerError> {
    let io = |source| WorkerError::Io { index: 0, source };
    write_line(out, &Line::Failed(reason.clone()))
        .await
        .map_err(io)?;
    out.flush().await.map_err(io)?;
    Err(WorkerError::Failed { index: 0, reason })
}
