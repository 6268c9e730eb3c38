//! A tonic server builder for control-plane servers, so each one gets the
//! same TLS and role check: with material, mutual TLS from the
//! control-plane CA and an [`AuthorizeLayer`]; without, plaintext, which
//! only a flag named for development asks for.

use tonic::transport::Server;
use tower::{
    layer::util::{Identity, Stack},
    util::{option_layer, Either},
};

use crate::{AuthorizeLayer, ControlTls};

/// The builder [`builder`] returns.
pub type ControlServer = Server<Stack<Either<AuthorizeLayer, Identity>, Identity>>;

/// A server builder: with `secured`, serving `ControlTls::server` and
/// admitting requests as the layer's policy says.
pub fn builder(
    secured: Option<(&ControlTls, AuthorizeLayer)>,
) -> Result<ControlServer, tonic::transport::Error> {
    let mut server = Server::builder().tcp_nodelay(true);
    let mut authorize = None;
    if let Some((tls, layer)) = secured {
        server = server.tls_config(tls.server())?;
        authorize = Some(layer);
    }
    Ok(server.layer(option_layer(authorize)))
}
