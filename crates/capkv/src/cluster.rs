//! What both sides of a node (cp and ap) stand on: how nodes are named, how long a peer
//! counts as reachable, and how big a page of answers may be. Below `cp/` and `ap/`, so
//! neither imports the other (or `node.rs`) for these.

use std::time::Duration;

/// A node's id in the cluster (Raft's node id, and the ap ring's).
pub type NodeId = u64;

/// A peer counts as reachable if it was heard from this recently.
pub const REACHABLE_WINDOW: Duration = Duration::from_millis(1000);

/// Most bytes of rows one page of any scan carries (cp and ap alike; beyond it the
/// page ends early, says there is more, and the client continues with `after=`), and
/// one anti-entropy answer. Far below the peer frame limit, so a page forwarded
/// between nodes always fits in one frame.
pub const PAGE_BYTES_MAX: usize = 4 << 20;
