//! `/ws`: one WebSocket per node. The first message must be `join` (room, token, name,
//! profile); after that the node's messages go to its room and the room's messages come back
//! through a writer task. Every message is size-checked before it is parsed; a node that keeps
//! sending garbage, to the server or (as its next node reports) to the ring, is dropped, and
//! the room goes on.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use mdi_runtime::protocol::{self, ToNode, ToServer, MAX_CONTROL_MESSAGE};
use tokio::sync::mpsc;

use crate::AppState;

/// How long a new connection may take to say `join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /ws`
pub async fn upgrade(State(app): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_CONTROL_MESSAGE)
        .max_frame_size(MAX_CONTROL_MESSAGE)
        .on_upgrade(move |socket| session(app, socket))
}

fn valid_room(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

async fn refuse(socket: &mut WebSocket, reason: String) {
    tracing::info!("refused a node: {reason}");
    let msg = protocol::encode(&ToNode::Refused { reason });
    let _ = socket.send(Message::Text(msg.into())).await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn session(app: Arc<AppState>, mut socket: WebSocket) {
    // The join.
    let first = match tokio::time::timeout(JOIN_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(_))) => {
            return refuse(
                &mut socket,
                "the first message must be a text `join`".into(),
            )
            .await
        }
        Ok(_) => return,
        Err(_) => return refuse(&mut socket, "no `join` within 10 s".into()).await,
    };
    let (room, name, kind, profile) = match protocol::decode::<ToServer>(&first) {
        Ok(ToServer::Join {
            room,
            token,
            name,
            kind,
            profile,
        }) => {
            if app.token.is_some() && token != app.token {
                return refuse(&mut socket, "wrong or missing room token".into()).await;
            }
            if !valid_room(&room) {
                return refuse(
                    &mut socket,
                    format!("room name `{room}` is not 1-64 letters, digits, - or _"),
                )
                .await;
            }
            let bad_number = |x: f64| !x.is_finite() || x <= 0.0;
            if bad_number(profile.speed)
                || !(profile.weight_factor.is_finite() && profile.weight_factor >= 1.0)
            {
                return refuse(
                    &mut socket,
                    "the profile's speed or weight factor is not a positive number".into(),
                )
                .await;
            }
            let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
            (room, name, kind, profile)
        }
        Ok(_) => return refuse(&mut socket, "the first message must be `join`".into()).await,
        Err(e) => return refuse(&mut socket, e).await,
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<ToNode>();
    let id = app.hub().join(&room, name, kind, profile, tx);
    let (mut write, mut read) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write
                .send(Message::Text(protocol::encode(&m).into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = write.send(Message::Close(None)).await;
    });
    let mut why = "its connection closed";
    while let Some(msg) = read.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) => break,
            Ok(Message::Binary(_)) => {
                if app
                    .hub()
                    .bad_message(&room, id, "binary messages are not part of the protocol")
                {
                    why = "too many bad messages";
                    break;
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!("node {id}: {e}");
                why = "its connection failed";
                break;
            }
        };
        match protocol::decode::<ToServer>(&text) {
            Ok(m) => {
                let left = m == ToServer::Leave;
                let mut hub = app.hub();
                hub.handle(&room, id, m, &app.model.facts);
                if left {
                    why = "it left";
                    break;
                }
                // Another node's report can drop this one; then its connection ends too.
                if !hub.is_member(&room, id) {
                    why = "it was dropped from the room";
                    break;
                }
            }
            Err(e) => {
                if app.hub().bad_message(&room, id, &e) {
                    why = "too many bad messages";
                    break;
                }
            }
        }
    }
    app.hub().leave(&room, id, why, &app.model.facts);
    writer.abort();
}
