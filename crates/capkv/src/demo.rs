//! `capkv demo atm|inventory|cart`: the seed documents' scenarios, run against a live
//! cluster (such as `capkv dev`) with real partitions made through the fault API.
//!
//! Each scenario runs once in a cp keyspace and once in an ap keyspace (the cart only
//! in ap), cutting the first node off from the others, then heals and prints what each
//! side saw and the final state in plain words.

use std::time::{Duration, Instant};

use capkv_client::{
    Client, ClientError, Consistency, ErrorCode, KeyspaceSpec, Mode, ValueType, WriteOptions,
};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Scenario {
    /// Two ATMs, one account of 100, each withdraws 60 during a partition.
    Atm,
    /// 10 items in stock; the US side orders 7 and the EU side orders 5 during a partition.
    Inventory,
    /// A shopping cart filled from both sides of a partition.
    Cart,
}

struct Demo {
    entry: Client,
    urls: Vec<String>,
    names: Vec<String>,
}

fn fail(e: ClientError) -> String {
    e.to_string()
}

fn say(s: &str) {
    println!("{s}");
}

impl Demo {
    async fn connect(node: &str) -> Result<Demo, String> {
        let entry = Client::new([node.to_owned()]);
        let info = entry.cluster().await.map_err(fail)?;
        if info.nodes.len() < 3 {
            return Err("the demos need a cluster of at least 3 nodes (capkv dev)".into());
        }
        let urls = info
            .nodes
            .iter()
            .map(|n| format!("http://{}", n.http_addr))
            .collect();
        let names = info.nodes.iter().map(|n| n.id.clone()).collect();
        Ok(Demo { entry, urls, names })
    }

    /// A client bound to one node: the demo must know which side served each request.
    fn at(&self, i: usize) -> Client {
        Client::new([self.urls[i].clone()])
    }

    async fn keyspace(&self, name: &str, mode: Mode, t: Option<ValueType>) -> Result<(), String> {
        let spec = KeyspaceSpec {
            value_type: t,
            ..KeyspaceSpec::new(name, mode)
        };
        match self.entry.create_keyspace(&spec).await {
            Ok(_) => {}
            Err(ClientError::Api { error, .. }) if error.code == ErrorCode::Conflict => {}
            Err(e) => return Err(fail(e)),
        }
        // Wait until every node has applied the registry entry.
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..self.urls.len() {
            while !self
                .at(i)
                .list_keyspaces_serializable()
                .await
                .is_ok_and(|l| l.iter().any(|k| k.name == name))
            {
                if Instant::now() > deadline {
                    return Err(format!("keyspace {name} did not reach {}", self.names[i]));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Cuts the first node off from all the others, on every node, and waits until both
    /// sides have noticed.
    async fn partition(&self) -> Result<(), String> {
        let (alone, rest) = (&self.names[0], &self.names[1..]);
        say(&format!("  ✂  partition: {alone} | {}", rest.join(",")));
        for (i, url) in self.urls.iter().enumerate() {
            let isolate = if i == 0 {
                rest.to_vec()
            } else {
                vec![alone.clone()]
            };
            self.entry.set_faults(url, isolate).await.map_err(fail)?;
        }
        self.wait(|c| !c.has_quorum, 0).await?;
        // The majority side elects a leader of its own (if the cut-off node led) before
        // the scenario goes on, as a real client would retry until it had.
        let alone = alone.clone();
        self.wait(move |c| c.leader.as_ref().is_some_and(|l| *l != alone), 1)
            .await
    }

    async fn heal(&self) -> Result<(), String> {
        say("  ⚕  heal");
        for url in &self.urls {
            self.entry.set_faults(url, Vec::new()).await.map_err(fail)?;
        }
        for i in 0..self.urls.len() {
            self.wait(|c| c.nodes.iter().all(|n| n.reachable), i)
                .await?;
        }
        // And until the node that was cut off has caught up with the Raft log.
        let commit = self
            .entry
            .cluster_of(&self.urls[1])
            .await
            .map_err(fail)?
            .commit_index;
        self.wait(|c| c.applied_index >= commit, 0).await
    }

    async fn wait(
        &self,
        cond: impl Fn(&capkv_client::ClusterInfo) -> bool,
        node: usize,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(info) = self.entry.cluster_of(&self.urls[node]).await {
                if cond(&info) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not reach the expected state",
                    self.names[node]
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A cp "read, check, compare-and-set" withdrawal through node `i`.
    async fn cp_take(
        &self,
        i: usize,
        ks: &str,
        key: &str,
        amount: i64,
        who: &str,
    ) -> Result<(), String> {
        let c = self.at(i);
        let node = &self.names[i];
        let cur = match c.get(ks, key.as_bytes(), Consistency::Linearizable).await {
            Ok(Some(v)) => v,
            Ok(None) => return Err(format!("{key} missing")),
            Err(e) => {
                say(&format!(
                    "  {who} via {node}: REFUSED ({e}) — no stale answer, nothing changed"
                ));
                return Ok(());
            }
        };
        let have: i64 = String::from_utf8_lossy(&cur.value).parse().unwrap_or(0);
        if have < amount {
            say(&format!("  {who} via {node}: refused, only {have} left"));
            return Ok(());
        }
        let opts = WriteOptions {
            if_version: Some(cur.version),
            ..Default::default()
        };
        match c
            .put(
                ks,
                key.as_bytes(),
                (have - amount).to_string().into_bytes(),
                &opts,
            )
            .await
        {
            Ok(_) => say(&format!(
                "  {who} via {node}: saw {have}, took {amount}, {} left",
                have - amount
            )),
            Err(e) => say(&format!("  {who} via {node}: REFUSED ({e})")),
        }
        Ok(())
    }

    /// An ap counter withdrawal through node `i`: checks the balance this side can see.
    async fn ap_take(
        &self,
        i: usize,
        ks: &str,
        key: &str,
        amount: i64,
        who: &str,
    ) -> Result<(), String> {
        let c = self.at(i);
        let node = &self.names[i];
        let have = c.counter(ks, key.as_bytes(), None).await.map_err(fail)?;
        if have < amount {
            say(&format!("  {who} via {node}: refused, only {have} left"));
            return Ok(());
        }
        c.incr(ks, key.as_bytes(), -amount, None)
            .await
            .map_err(fail)?;
        say(&format!("  {who} via {node}: saw {have}, took {amount} — accepted (this side could not check the other)"));
        Ok(())
    }

    async fn cp_set(&self, ks: &str, key: &str, value: i64) -> Result<(), String> {
        self.entry
            .put(
                ks,
                key.as_bytes(),
                value.to_string().into_bytes(),
                &WriteOptions::default(),
            )
            .await
            .map_err(fail)?;
        Ok(())
    }

    async fn ap_reset_counter(&self, ks: &str, key: &str, value: i64) -> Result<(), String> {
        let have = self
            .entry
            .counter(ks, key.as_bytes(), Some(3))
            .await
            .map_err(fail)?;
        self.entry
            .incr(ks, key.as_bytes(), value - have, Some(3))
            .await
            .map_err(fail)?;
        Ok(())
    }

    async fn cp_value(&self, ks: &str, key: &str) -> Result<i64, String> {
        let v = self
            .entry
            .get(ks, key.as_bytes(), Consistency::Linearizable)
            .await
            .map_err(fail)?;
        Ok(
            v.map(|v| String::from_utf8_lossy(&v.value).parse().unwrap_or(0))
                .unwrap_or(0),
        )
    }
}

async fn atm(d: &Demo) -> Result<(), String> {
    say("ATM: one account holding 100; ATM-A and ATM-B each withdraw 60 while the network is split.\n");
    d.keyspace("demo_bank", Mode::Cp, None).await?;
    d.keyspace("demo_bank_ap", Mode::Ap, Some(ValueType::Counter))
        .await?;

    say("cp keyspace demo_bank (consistency over availability):");
    d.cp_set("demo_bank", "alice", 100).await?;
    d.partition().await?;
    d.cp_take(0, "demo_bank", "alice", 60, "ATM-A").await?;
    d.cp_take(1, "demo_bank", "alice", 60, "ATM-B").await?;
    d.heal().await?;
    say(&format!("  after the heal the balance is {}: the second withdrawal was refused, never an overdraft.\n", d.cp_value("demo_bank", "alice").await?));

    say("ap keyspace demo_bank_ap, a counter (availability over consistency):");
    d.ap_reset_counter("demo_bank_ap", "alice", 100).await?;
    d.partition().await?;
    d.ap_take(0, "demo_bank_ap", "alice", 60, "ATM-A").await?;
    d.ap_take(1, "demo_bank_ap", "alice", 60, "ATM-B").await?;
    d.heal().await?;
    let b = d
        .entry
        .counter("demo_bank_ap", b"alice", Some(3))
        .await
        .map_err(fail)?;
    say(&format!(
        "  after the heal the balance is {b}{}.",
        if b < 0 {
            format!(": both withdrawals went through — an overdraft of {}", -b)
        } else {
            String::new()
        }
    ));
    Ok(())
}

async fn inventory(d: &Demo) -> Result<(), String> {
    say("Inventory: 10 widgets in stock; the US side orders 7 and the EU side orders 5 while the network is split.\n");
    d.keyspace("demo_stock", Mode::Cp, None).await?;
    d.keyspace("demo_stock_ap", Mode::Ap, Some(ValueType::Counter))
        .await?;

    say("cp keyspace demo_stock:");
    d.cp_set("demo_stock", "widgets", 10).await?;
    d.partition().await?;
    d.cp_take(0, "demo_stock", "widgets", 7, "US order of 7")
        .await?;
    d.cp_take(1, "demo_stock", "widgets", 5, "EU order of 5")
        .await?;
    d.heal().await?;
    let left = d.cp_value("demo_stock", "widgets").await?;
    say(&format!(
        "  after the heal {left} are left: {} sold, never more than the 10 in stock.\n",
        10 - left
    ));

    say("ap keyspace demo_stock_ap, a counter:");
    d.ap_reset_counter("demo_stock_ap", "widgets", 10).await?;
    d.partition().await?;
    d.ap_take(0, "demo_stock_ap", "widgets", 7, "US order of 7")
        .await?;
    d.ap_take(1, "demo_stock_ap", "widgets", 5, "EU order of 5")
        .await?;
    d.heal().await?;
    let left = d
        .entry
        .counter("demo_stock_ap", b"widgets", Some(3))
        .await
        .map_err(fail)?;
    let sold = 10 - left;
    say(&format!(
        "  after the heal the stock is {left}: {sold} sold from 10{}.",
        if sold > 10 {
            format!(" — oversold by {}", sold - 10)
        } else {
            String::from(", no oversell this time")
        }
    ));
    Ok(())
}

async fn cart(d: &Demo) -> Result<(), String> {
    say("Cart: a shopping cart filled from both sides of a split network.\n");
    d.keyspace("demo_cart", Mode::Ap, Some(ValueType::Set))
        .await?;
    let key = format!("cart-{:04x}", rand::random::<u16>());
    say(&format!("ap keyspace demo_cart, an add-wins set ({key}):"));
    d.entry
        .set_add("demo_cart", key.as_bytes(), &["coffee"], Some(3))
        .await
        .map_err(fail)?;
    d.partition().await?;
    let a = d
        .at(0)
        .set_add("demo_cart", key.as_bytes(), &["book"], None)
        .await
        .map_err(fail)?;
    say(&format!(
        "  phone via {}: added book, sees {a:?}",
        d.names[0]
    ));
    let b = d
        .at(1)
        .set_add("demo_cart", key.as_bytes(), &["lamp", "pen"], None)
        .await
        .map_err(fail)?;
    say(&format!(
        "  laptop via {}: added lamp and pen, sees {b:?}",
        d.names[1]
    ));
    let b = d
        .at(1)
        .set_remove("demo_cart", key.as_bytes(), &["coffee"], None)
        .await
        .map_err(fail)?;
    say(&format!(
        "  laptop via {}: removed coffee, sees {b:?}",
        d.names[1]
    ));
    d.heal().await?;
    let all = d
        .entry
        .set_members("demo_cart", key.as_bytes(), Some(3))
        .await
        .map_err(fail)?;
    say(&format!("  after the heal the cart is {all:?}: every item added on either side is kept, and the removal too."));
    Ok(())
}

pub async fn run(scenario: Scenario, node: &str) -> Result<(), String> {
    let d = Demo::connect(node).await?;
    let result = match scenario {
        Scenario::Atm => atm(&d).await,
        Scenario::Inventory => inventory(&d).await,
        Scenario::Cart => cart(&d).await,
    };
    if result.is_err() {
        // Never leave the cluster partitioned behind us.
        for url in &d.urls {
            let _ = d.entry.set_faults(url, Vec::new()).await;
        }
    }
    result
}
