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
