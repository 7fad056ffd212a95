//! A custom extension (Ktor's extensions API): `x-reverse` reverses the
//! bytes of every binary message on the wire and marks it with RSV3. It is a
//! toy transformation; what it shows is the whole contract: a factory that
//! negotiates from the client's offers, and a per-connection extension that
//! encodes outgoing messages and decodes incoming ones, next to
//! permessage-deflate (which claims RSV1).
//!
//! Run with `cargo run -p duplex --example custom_extension`; the test at the
//! bottom speaks `x-reverse` over a real socket (`cargo test -p duplex
//! --example custom_extension`).

use bytes::Bytes;
use duplex::{
    App, Deflate, Extension, ExtensionFactory, ExtensionOffer, OpCode, Rsv, Session, WebSockets,
    proto::{Negotiated, ProtocolError},
};

/// Negotiates `x-reverse`, which takes no parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReverseFactory;

impl ExtensionFactory for ReverseFactory {
    fn name(&self) -> &str {
        "x-reverse"
    }

    fn rsv(&self) -> Rsv {
        Rsv::RSV3
    }

    fn negotiate(&self, offers: &[&ExtensionOffer]) -> Option<Negotiated> {
        // Accept the first offer without parameters; decline the others.
        offers.iter().find(|offer| offer.params.is_empty())?;
        Some(Negotiated {
            response: ExtensionOffer::new("x-reverse"),
            extension: Box::new(Reverse),
        })
    }
}

/// `x-reverse` on one connection.
#[derive(Debug)]
pub struct Reverse;

fn reversed(payload: &[u8]) -> Bytes {
    payload.iter().rev().copied().collect::<Vec<u8>>().into()
}

impl Extension for Reverse {
    fn name(&self) -> &str {
        "x-reverse"
    }

    fn rsv(&self) -> Rsv {
        Rsv::RSV3
    }

    fn encode(&mut self, opcode: OpCode, payload: Bytes) -> Result<(Rsv, Bytes), ProtocolError> {
        // Text stays as it is: reversed UTF-8 would not be UTF-8.
        match opcode {
            OpCode::Binary => Ok((Rsv::RSV3, reversed(&payload))),
            _ => Ok((Rsv::NONE, payload)),
        }
    }

    fn decode(
        &mut self,
        opcode: OpCode,
        _rsv: Rsv,
        payload: Bytes,
        _max_size: u64,
    ) -> Result<Bytes, ProtocolError> {
        match opcode {
            OpCode::Binary => Ok(reversed(&payload)),
            _ => Err(ProtocolError::ExtensionData(
                "x-reverse marks binary messages only".into(),
            )),
        }
    }
}

/// The app: a mirror with both extensions installed.
pub fn app() -> App {
    let websockets = WebSockets::default()
        .extension(Deflate::default())
        .and_then(|ws| ws.extension(ReverseFactory))
        .expect("RSV1 and RSV3 do not conflict");
    App::new()
        .install(websockets)
        .web_socket("/mirror", |mut session: Session| async move {
            println!("negotiated: {:?}", session.extensions());
            while let Some(message) = session.recv().await? {
                session.send(message).await?;
            }
            Ok::<_, duplex::Error>(())
        })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    app()
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn connect(offer: &str) -> (tokio::net::TcpStream, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(app().serve_with_shutdown(listener, std::future::pending()));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /mirror HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: {offer}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        (tcp, String::from_utf8(head).unwrap().to_lowercase())
    }

    /// A masked binary frame with the given RSV bits (mask of zeros: the
    /// payload stays readable).
    fn frame(rsv: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![
            0x80 | (rsv << 4) | 0x2,
            0x80 | payload.len() as u8,
            0,
            0,
            0,
            0,
        ];
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn x_reverse_is_negotiated_and_applied_both_ways() {
        let (mut tcp, head) = connect("x-reverse").await;
        assert!(
            head.contains("sec-websocket-extensions: x-reverse"),
            "{head}"
        );
        // We send "abc" reversed on the wire, marked RSV3.
        tcp.write_all(&frame(0b001, b"cba")).await.unwrap();
        let mut reply = [0u8; 5];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tcp.read_exact(&mut reply),
        )
        .await
        .unwrap()
        .unwrap();
        // The mirror sends "abc" back, reversed again on the wire with RSV3.
        assert_eq!(reply, [0x80 | 0b001_0000 | 0x2, 3, b'c', b'b', b'a']);
    }

    #[tokio::test]
    async fn rsv3_without_negotiation_fails_with_1002() {
        let (mut tcp, head) = connect("x-other").await;
        assert!(!head.contains("sec-websocket-extensions"), "{head}");
        tcp.write_all(&frame(0b001, b"cba")).await.unwrap();
        let mut reply = [0u8; 4];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tcp.read_exact(&mut reply),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(reply[0], 0x88);
        assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1002);
    }

    #[test]
    fn conflicting_rsv_bits_are_refused_when_the_configuration_is_built() {
        #[derive(Debug)]
        struct AlsoRsv3;
        impl ExtensionFactory for AlsoRsv3 {
            fn name(&self) -> &str {
                "x-also"
            }
            fn rsv(&self) -> Rsv {
                Rsv::RSV3
            }
            fn negotiate(&self, _: &[&ExtensionOffer]) -> Option<Negotiated> {
                None
            }
        }
        let err = WebSockets::default()
            .extension(ReverseFactory)
            .unwrap()
            .extension(AlsoRsv3)
            .unwrap_err();
        assert_eq!(err.installed, "x-reverse");
        assert_eq!(err.bits, 0b001);
    }
}
