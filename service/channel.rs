//! A gRPC channel to a server's Unix socket, for the CLI, the benchmark and tests alike.

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint};

/// Connects to the server listening on the Unix socket at `socket`.
pub async fn unix(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
    // The URI is required but unused: the connector decides where to connect.
    unix_with(Endpoint::from_static("http://localhost"), socket).await
}

/// Connects `endpoint`, with its timeouts and other settings, to the Unix socket at `socket`.
pub async fn unix_with(
    endpoint: Endpoint,
    socket: PathBuf,
) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
