//! The Trellis load-test harness: simulated Envoys against an ADS server,
//! and how fast configuration reaches them.
//!
//! * [`mesh`]: the generated mesh (Kubernetes YAML for the file source) and
//!   its endpoint churn.
//! * [`target`]: Trellis started by the harness (its own process, or the
//!   harness's), or a server it does not control.
//! * [`envoy`]: one simulated Envoy, Delta or state of the world, that
//!   reconnects elsewhere when its stream ends.
//! * [`clients`]: a share of the simulated Envoys started in one process.
//! * [`worker`]: shares in several processes, reporting to the one that
//!   measures.
//! * [`run`]: connect storm, settle, the scenario (steady, churn, policy,
//!   edge kill, leader failover, scale-out, chaos, membership), measure.
//! * [`scale_out`]: edges added under load, and how streams spread onto
//!   them.
//! * [`chaos`]: edges and leaders killed and restarted at random.
//! * [`membership`]: the leader group grown and shrunk under load.
//! * [`clock`]: the time every process of a run reads.
//! * [`report`]: percentiles, resource use, summary, JSON and SVG.
//! * [`procfs`]: CPU and memory of the processes under test.

pub mod chaos;
pub mod clients;
pub mod clock;
pub mod envoy;
pub mod membership;
pub mod mesh;
pub mod procfs;
pub mod report;
pub mod run;
pub mod scale_out;
pub mod target;
pub mod worker;
