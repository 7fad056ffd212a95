//! One node of a cluster: `/room` joins every connection to one room, and a
//! message sent on any node reaches every connection of every node.
//!
//! ```sh
//! redis-server --port 6379 &
//! cargo run -p duplex-redis --example cluster -- 127.0.0.1:8081 redis://127.0.0.1:6379/ &
//! cargo run -p duplex-redis --example cluster -- 127.0.0.1:8082 redis://127.0.0.1:6379/ &
//! # a client on ws://127.0.0.1:8081/room hears one on ws://127.0.0.1:8082/room
//! ```

use duplex::{App, Hub, Session, WebSockets};
use duplex_redis::RedisBackplane;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8081".to_owned());
    let redis = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());

    // A node may well start before its Redis: it waits for it.
    let backplane = RedisBackplane::builder(&redis, "duplex-cluster-example")
        .retry_at_start(true)
        .connect()
        .await?;
    let hub = Hub::builder().backplane(backplane).build();
    let app = App::new().install(WebSockets::default()).web_socket(
        "/room",
        move |mut session: Session| {
            let hub = hub.clone();
            async move {
                let membership = hub.register(&session.sender());
                membership.join("room");
                while let Some(message) = session.recv().await? {
                    hub.publish("room", message);
                }
                Ok::<_, duplex::Error>(())
            }
        },
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("node on ws://{addr}/room, joined through {redis}");
    app.serve(listener).await?;
    Ok(())
}
