//! The `capkv` binary: parses the command line and calls the library.

use clap::Parser;

use capkv::cli::{run_client, Cli, Cmd};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // `check` and `check-history` promise exit codes 0-3 (3: the harness failed), so a
        // command line they cannot use is a 3, not clap's 2 (which would read as "unknown").
        let checking = std::env::args()
            .nth(1)
            .is_some_and(|a| a == "check" || a == "check-history");
        if checking && e.use_stderr() {
            let _ = e.print();
            std::process::exit(3);
        }
        e.exit()
    });
    let cli = match cli.command {
        // Each simulated seed builds its own single-threaded runtime.
        Cmd::Sim(args) => {
            capkv::cli::exit_quietly_on_closed_stdout();
            std::process::exit(capkv::sim::main(args))
        }
        other => Cli { command: other },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Cmd::Serve(args) => {
                init_tracing();
                let config = args.into_config().map_err(|e| e.to_string())?;
                capkv::server::run(config).await
            }
            Cmd::Dev {
                nodes,
                base_port,
                data_dir,
            } => {
                init_tracing();
                capkv::dev::run(capkv::dev::DevOptions {
                    nodes,
                    base_port,
                    data_dir,
                })
                .await
            }
            Cmd::Check(args) => {
                init_tracing();
                let code = capkv::check::run(args.into_options()).await;
                std::process::exit(code);
            }
            Cmd::Bench(args) => capkv::bench::run(args).await,
            Cmd::Certs { cmd } => capkv::cli::run_certs(cmd),
            Cmd::CheckHistory {
                format,
                file,
                out,
                check_time,
            } => {
                let code = capkv::check::check_history(
                    format,
                    &file,
                    out.as_deref(),
                    std::time::Duration::from_secs(check_time),
                );
                std::process::exit(code);
            }
            other => run_client(other).await,
        }
    });
    // Not the runtime's drop, which waits for every blocking thread: one stuck in a storage
    // call that never returns (a stalled disk) would keep a stopped node alive forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
