//! Authentication before the upgrade with a session cookie, the way a
//! browser page authenticates: the page's own `Cookie` header comes with the
//! WebSocket handshake, the server checks it (401 before any 101 when it is
//! missing or unknown) and hands the user to the session. The same-origin
//! check that duplex makes by default is what keeps another site's page
//! from riding on the same cookie.
//!
//! ```sh
//! cargo run -p duplex --example auth_cookie
//! # open http://127.0.0.1:8080/login?name=alice, then http://127.0.0.1:8080/
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Query, Request},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use duplex::{App, Session};

/// Who the client is.
#[derive(Clone)]
struct User {
    name: String,
}

/// Session ids handed out by `/login`, and whose they are.
type Logins = Arc<Mutex<HashMap<String, User>>>;

fn session_cookie(request: &Request) -> Option<&str> {
    let cookies = request.headers().get(header::COOKIE)?.to_str().ok()?;
    cookies
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(name, value)| (name == "sid").then_some(value))
}

async fn require_login(logins: Logins, mut request: Request, next: Next) -> Response {
    let user = session_cookie(&request).and_then(|sid| {
        logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sid)
            .cloned()
    });
    match user {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn greet(session: Session) -> Result<(), duplex::Error> {
    let name = session
        .request()
        .extension::<User>()
        .map_or("stranger", |user| user.name.as_str())
        .to_owned();
    session.send_text(format!("hello, {name}")).await
}

const PAGE: &str = r#"<!doctype html><p id="out">connecting…</p><script>
const ws = new WebSocket(`ws://${location.host}/ws`);
ws.onmessage = (e) => { document.getElementById("out").textContent = e.data; };
ws.onclose = (e) => { if (e.code === 1006) document.getElementById("out").textContent = "refused: log in first"; };
</script>"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let logins = Logins::default();
    let app = App::new();
    let ws = app.websockets().clone();
    let check = Arc::clone(&logins);
    let socket = duplex::web_socket(&ws, greet).layer(middleware::from_fn(move |req, next| {
        require_login(Arc::clone(&check), req, next)
    }));
    let login = get(
        move |Query(query): Query<HashMap<String, String>>| async move {
            let name = query.get("name").cloned().unwrap_or_else(|| "guest".into());
            let sid = format!("{:032x}", rand::random::<u128>());
            logins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(sid.clone(), User { name });
            (
                [(
                    header::SET_COOKIE,
                    format!("sid={sid}; HttpOnly; SameSite=Lax; Path=/"),
                )],
                "logged in; open /",
            )
        },
    );
    app.route("/", get(|| async { Html(PAGE) }))
        .route("/login", login)
        .route("/ws", socket)
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
