//! Authentication before the upgrade with a bearer token: a request without
//! `Authorization: Bearer …` gets 401, a wrong token 403, both before any
//! 101; the session reads who the token named from its request.
//!
//! ```sh
//! cargo run -p duplex --example auth_bearer
//! # then, with any WebSocket client:
//! #   Authorization: Bearer alice-token   ->  "hello, alice"
//! ```

use axum::{
    extract::Request,
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use duplex::{App, Session};

/// Who the client is: any `Clone + Send + Sync` value the check finds.
#[derive(Clone)]
struct User {
    name: String,
}

/// Looks the token up (a database or a JWT check in a real server).
fn user_for(token: &str) -> Option<User> {
    let name = token.strip_suffix("-token")?;
    ["alice", "bob"].contains(&name).then(|| User {
        name: name.to_owned(),
    })
}

async fn require_bearer(mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(token) = token else {
        return (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")]).into_response();
    };
    match user_for(token) {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => StatusCode::FORBIDDEN.into_response(),
    }
}

async fn greet(session: Session) -> Result<(), duplex::Error> {
    // The middleware ran first: the route is only reached with a user.
    let name = session
        .request()
        .extension::<User>()
        .map_or("stranger", |user| user.name.as_str())
        .to_owned();
    session.send_text(format!("hello, {name}")).await
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = App::new();
    let ws = app.websockets().clone();
    let route = duplex::web_socket(&ws, greet).layer(middleware::from_fn(require_bearer));
    app.route("/ws", route)
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
