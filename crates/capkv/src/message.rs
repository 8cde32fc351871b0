//! Typed peer messages: every message names its reply.
//!
//! A side (cp, ap) declares its messages with [`messages!`]: one line per message gives
//! its request type, the type of its reply, and the method of the side's `Serve` trait
//! that answers it. From that line come the side's request and response enums, the
//! message's [`Rpc`] impl, and the dispatch. So:
//! - a sender gets back the reply type of the message it sent ([`ask`]); a reply of
//!   another message, which only a broken or hostile peer sends, fails that one call as a
//!   lost reply (the request may have been applied), in this one place;
//! - a server answers each message through its own method, whose return type is that
//!   message's reply: a reply of the wrong type cannot be written.
//!
//! This module sits below both sides (it knows the network, not cp or ap).

use std::time::Duration;

use crate::cluster::NodeId;
use crate::net::{NetError, Peers};

/// A peer message of one side, and the reply it gets.
pub trait Rpc: Sized + Send + 'static {
    /// The side's request enum, which carries this message.
    type Request: Send + 'static;
    /// The side's response enum, which carries the reply.
    type Response: Send + 'static;
    /// This message's reply.
    type Reply;
    /// The message's name, for errors and logs.
    const NAME: &'static str;

    fn request(self) -> Self::Request;

    /// The reply, if `r` is this message's; else `r` back.
    fn reply(r: Self::Response) -> Result<Self::Reply, Self::Response>;
}

/// Sends `m` to `to` and returns its reply (see the module's doc for a reply of another
/// message).
pub async fn ask<M, P>(net: &P, to: NodeId, m: M, timeout: Duration) -> Result<M::Reply, NetError>
where
    M: Rpc,
    P: Peers<M::Request, M::Response> + ?Sized,
{
    let r = net.call(to, m.request(), timeout).await?;
    M::reply(r).map_err(|_| {
        NetError::Lost(
            to,
            format!("the peer answered {} with another message's reply", M::NAME),
        )
    })
}

/// Declares one side's messages (see the module's doc):
///
/// ```ignore
/// messages! {
///     /// doc of the request enum
///     pub enum ApRequest;
///     pub enum ApResponse;
///     /// doc of the serving trait
///     pub trait ServeAp;
///     /// doc of the message
///     ApRead(ApRead) => fn read -> Result<Held, ApiError>;
/// }
/// ```
macro_rules! messages {
    (
        $(#[$req_doc:meta])* pub enum $Req:ident;
        $(#[$resp_doc:meta])* pub enum $Resp:ident;
        $(#[$serve_doc:meta])* pub trait $Serve:ident;
        $( $(#[$doc:meta])* $Variant:ident($Msg:ty) => fn $method:ident -> $Reply:ty; )+
    ) => {
        $(#[$req_doc])*
        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        pub enum $Req {
            $( $(#[$doc])* $Variant($Msg), )+
        }

        $(#[$resp_doc])*
        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        pub enum $Resp {
            $( $Variant($Reply), )+
        }

        $(
            impl $crate::message::Rpc for $Msg {
                type Request = $Req;
                type Response = $Resp;
                type Reply = $Reply;
                const NAME: &'static str = stringify!($Variant);

                fn request(self) -> $Req {
                    $Req::$Variant(self)
                }

                fn reply(r: $Resp) -> Result<$Reply, $Resp> {
                    #[allow(unreachable_patterns)]
                    match r {
                        $Resp::$Variant(reply) => Ok(reply),
                        other => Err(other),
                    }
                }
            }
        )+

        $(#[$serve_doc])*
        pub trait $Serve: Sync {
            $(
                fn $method(
                    &self,
                    from: $crate::cluster::NodeId,
                    m: $Msg,
                ) -> impl std::future::Future<Output = $Reply> + Send;
            )+
        }

        impl $Req {
            /// The message's name.
            pub fn name(&self) -> &'static str {
                match self {
                    $( $Req::$Variant(_) => stringify!($Variant), )+
                }
            }

            /// Answers this message with `server`'s method for it.
            pub async fn serve<S: $Serve>(self, server: &S, from: $crate::cluster::NodeId) -> $Resp {
                match self {
                    $( $Req::$Variant(m) => $Resp::$Variant(server.$method(from, m).await), )+
                }
            }
        }
    };
}

pub(crate) use messages;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::net::CallFuture;

    messages! {
        pub enum TestRequest;
        pub enum TestResponse;
        pub trait ServeTest;
        Echo(Echo) => fn on_echo -> String;
        Count(Count) => fn on_count -> u64;
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Echo(String);

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Count;

    struct Server;

    impl ServeTest for Server {
        async fn on_echo(&self, _from: NodeId, m: Echo) -> String {
            m.0
        }

        async fn on_count(&self, from: NodeId, _m: Count) -> u64 {
            from
        }
    }

    /// A peer that answers with [`Server`] through the generated dispatch; a lying one
    /// answers an `Echo` with a `Count`'s reply.
    struct Loopback {
        lies: bool,
    }

    impl Peers<TestRequest, TestResponse> for Loopback {
        fn call(
            &self,
            _to: NodeId,
            req: TestRequest,
            _t: Duration,
        ) -> CallFuture<'_, TestResponse> {
            Box::pin(async move {
                let reply = req.serve(&Server, 7).await;
                Ok(match reply {
                    TestResponse::Echo(_) if self.lies => TestResponse::Count(1),
                    honest => honest,
                })
            })
        }

        fn reachable(&self, _peer: NodeId, _window: Duration) -> bool {
            true
        }
    }

    const WAIT: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_message_gets_back_its_own_reply_type() {
        let net = Loopback { lies: false };
        let echoed: String = ask(&net, 2, Echo("hi".into()), WAIT).await.unwrap();
        assert_eq!(echoed, "hi");
        let counted: u64 = ask(&net, 2, Count, WAIT).await.unwrap();
        assert_eq!(counted, 7, "the server was told who sent it");
        assert_eq!(Echo("x".into()).request().name(), "Echo");
    }

    #[tokio::test]
    async fn the_reply_to_another_message_fails_the_call_as_lost() {
        let net = Loopback { lies: true };
        match ask(&net, 2, Echo("hi".into()), WAIT).await {
            Err(NetError::Lost(2, why)) => assert!(why.contains("Echo"), "{why}"),
            other => panic!("a lying peer's reply was taken: {other:?}"),
        }
        // Lost, not refused: the request may have been applied.
        assert!(NetError::Lost(2, String::new()).maybe_delivered());
    }
}
