//! A real PostgreSQL server for the store tests, started once per test run
//! on a free port on 127.0.0.1, with a fresh database per test.
//!
//! The server's binaries are found through `BALANCER_TEST_PG_BIN`, else
//! `initdb` on the `PATH`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package). PostgreSQL refuses to run as root; as
//! root, the server runs as the `postgres` user that package creates.
//!
//! It stops by itself: a small shell holds the server and waits on a pipe
//! from this process; when the test binary exits, for any reason, the pipe
//! closes and the shell stops the server and removes its data directory.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use sqlx::Connection;

struct Server {
    port: u16,
    /// Holds the pipe whose closing stops the server.
    _guard: Mutex<Child>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// A URL to a new, empty database on the shared test server.
pub(crate) async fn fresh_database() -> String {
    let server = SERVER
        .get_or_init(start)
        .as_ref()
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL for the tests: {e}"));
    let name = format!(
        "t_{}",
        rand::Rng::sample_iter(rand::rng(), rand::distr::Alphanumeric)
            .take(12)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect::<String>()
    );
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port);
    let mut conn = sqlx::postgres::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    format!("postgres://postgres@127.0.0.1:{}/{name}", server.port)
}

fn start() -> Result<Server, String> {
    let bin = bin_dir()?;
    let dir = tempfile::Builder::new()
        .prefix("balancer-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        // Removed by the shell that stops the server.
        .keep();
    let data = dir.join("data");
    let user = server_user(&dir)?;
    let as_user = |cmd: &mut Command| {
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
    };
    initdb(&bin, &data, &as_user)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    // $0 postgres, $1 data dir, $2 port, $3 the directory to remove.
    let script = r#"
"$0" -D "$1" -p "$2" -h 127.0.0.1 -k "" -c fsync=off -c synchronous_commit=off \
     -c full_page_writes=off -c max_connections=300 &
pid=$!
read -r _ignored
kill -INT "$pid"
wait "$pid"
rm -rf "$3"
"#;
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(script)
        .arg(bin.join("postgres"))
        .arg(&data)
        .arg(port.to_string())
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_user(&mut shell);
    let mut child = shell.spawn().map_err(|e| format!("postgres: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    // The server says when it is ready; waiting on that line is waiting on
    // the event itself. It ends (EOF) if the server fails to start.
    let mut log = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                let ready = line.contains("ready to accept connections");
                log.push(line);
                if ready {
                    break;
                }
            }
            _ => return Err(format!("postgres exited: {}", log.join("\n"))),
        }
    }
    // Keep reading, or the server would block on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(Server {
        port,
        _guard: Mutex::new(child),
    })
}

/// A fresh data directory in `data`, run as the server's user.
fn initdb(bin: &Path, data: &Path, as_user: &dyn Fn(&mut Command)) -> Result<(), String> {
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_user(&mut initdb);
    let out = initdb.output().map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("BALANCER_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() {
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                return Ok(real.parent().unwrap_or(&dir).to_owned());
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().ok_or_else(|| {
        "PostgreSQL server binaries not found: install them (apt-get install postgresql) \
         or set BALANCER_TEST_PG_BIN to the directory holding initdb and postgres"
            .to_owned()
    })
}

/// As root, the `postgres` user (which then owns `dir`); otherwise ourselves.
fn server_user(dir: &Path) -> Result<Option<(u32, u32)>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .map_err(|e| e.to_string())?
        .ok_or("running as root needs a 'postgres' user to run the server (apt-get install postgresql creates it)")?;
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid)).map_err(|e| e.to_string())?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}
