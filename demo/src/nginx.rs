//! nginx (Debian's) as an ingress controller outside the mesh: one process
//! in a pod of its own, proxying every request to the backend's pods as
//! ingress-nginx does (to endpoints, not to the Service's address).

use std::net::SocketAddr;

use crate::{
    error::{io, DemoError},
    pods::Pod,
};

/// nginx's configuration: listen on `listen`, proxy everything to
/// `upstreams`, keep every file under `dir`.
pub fn config(dir: &std::path::Path, listen: u16, upstreams: &[SocketAddr]) -> String {
    let d = dir.display();
    let servers: String = (upstreams.iter())
        .map(|u| format!("    server {u};\n"))
        .collect();
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream backend {{\n{servers}  }}\n  \
         server {{\n    listen {listen};\n    location / {{ proxy_pass http://backend; }}\n  }}\n}}\n"
    )
}

/// Starts nginx in `pod` with [`config`], running as long as the pod; its
/// files (and `error.log`) in `<pod dir>/nginx`.
pub fn start(pod: &Pod, listen: u16, upstreams: &[SocketAddr]) -> Result<(), DemoError> {
    let dir = pod.dir().join("nginx");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(&dir, listen, upstreams))
        .map_err(io(format!("writing {}", conf.display())))?;
    // One process, no workers: stopping the pod leaves nothing behind.
    pod.start(&[
        "nginx",
        "-c",
        &conf.to_string_lossy(),
        "-g",
        "daemon off; master_process off;",
    ])
}

/// What nginx in `pod` logged.
pub fn error_log(pod: &Pod) -> String {
    std::fs::read_to_string(pod.dir().join("nginx/error.log")).unwrap_or_default()
}
