//! A target process for cross-process tests and `pdserve kvbench`: it registers a
//! region, prints its metadata, then for each `EXPECT` line waits for the write's
//! notification and checks the bytes that arrived against a pattern. The initiator
//! side ([`TargetProcess`]) drives it over the child's stdin/stdout.
//!
//! ```text
//! child  -> READY <hex metadata> <region id> <hex key>
//! parent -> EXPECT <tag> <seed> <segments> <seg_len> <dst_stride> <verify 0|1>
//! child  -> OK <tag> | BAD <tag> <what> | ERR <tag> <error>
//! parent -> EXIT
//! ```
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{Agent, HostBuffer, Memory, Registration, Segment};

/// Byte poisoned into the target region, so untouched gaps can be checked.
pub const POISON: u8 = 0xA5;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `out` with the pattern bytes at stream positions `start..start+out.len()`.
pub fn pattern_fill(seed: u64, start: u64, out: &mut [u8]) {
    let mut pos = start;
    let mut i = 0;
    while i < out.len() {
        let word = splitmix(seed ^ (pos / 8)).to_le_bytes();
        let within = (pos % 8) as usize;
        let n = (8 - within).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[within..within + n]);
        i += n;
        pos += n as u64;
    }
}

/// A regular scatter: `segments` pieces of `seg_len` bytes, contiguous at the source,
/// `dst_stride` apart at the target (a paged KV cache's shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub segments: u64,
    pub seg_len: u64,
    pub dst_stride: u64,
}

impl Layout {
    pub fn contiguous(len: u64) -> Self {
        Layout {
            segments: 1,
            seg_len: len,
            dst_stride: len,
        }
    }
    pub fn total(&self) -> u64 {
        self.segments * self.seg_len
    }
    pub fn src_span(&self) -> u64 {
        self.total()
    }
    pub fn dst_span(&self) -> u64 {
        (self.segments - 1) * self.dst_stride + self.seg_len
    }
    pub fn segments(&self, local: crate::RegionId, remote: u32) -> Vec<Segment> {
        (0..self.segments)
            .map(|i| Segment {
                local,
                local_offset: i * self.seg_len,
                remote,
                remote_offset: i * self.dst_stride,
                len: self.seg_len,
            })
            .collect()
    }
}

/// Reads `len` bytes of a target region at `offset` (host or GPU).
pub trait ReadBack: Send + Sync {
    fn read_at(&self, offset: u64, out: &mut [u8]);
    fn fill(&self, byte: u8);
}

impl ReadBack for HostBuffer {
    fn read_at(&self, offset: u64, out: &mut [u8]) {
        HostBuffer::read_at(self, offset as usize, out)
    }
    fn fill(&self, byte: u8) {
        HostBuffer::fill(self, byte)
    }
}

/// Checks the segments against the pattern and the gaps between them against
/// [`POISON`]; returns a description of the first difference.
pub fn verify(mem: &dyn ReadBack, layout: &Layout, seed: u64) -> Result<(), String> {
    const CHUNK: usize = 1 << 20;
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    for i in 0..layout.segments {
        let (dst, src) = (i * layout.dst_stride, i * layout.seg_len);
        let mut done = 0u64;
        while done < layout.seg_len {
            let n = (layout.seg_len - done).min(CHUNK as u64) as usize;
            mem.read_at(dst + done, &mut got[..n]);
            pattern_fill(seed, src + done, &mut want[..n]);
            if got[..n] != want[..n] {
                let at = got[..n].iter().zip(&want[..n]).position(|(a, b)| a != b).unwrap_or(0) as u64;
                return Err(format!("segment {i} differs at byte {}", done + at));
            }
            done += n as u64;
        }
        if i + 1 < layout.segments && layout.dst_stride > layout.seg_len {
            let gap = (layout.dst_stride - layout.seg_len).min(CHUNK as u64) as usize;
            mem.read_at(dst + layout.seg_len, &mut got[..gap]);
            if let Some(p) = got[..gap].iter().position(|b| *b != POISON) {
                return Err(format!("gap after segment {i} was overwritten at byte {p}"));
            }
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Runs the target side until `EXIT` or end of input. `mem` is the region (already
/// poisoned), registered as `reg`. The READY line carries a key issued for the parent
/// (over the child's stdout, which only the parent reads).
pub async fn serve_target(agent: &Agent, mem: Arc<dyn ReadBack>, reg: &Registration, deadline: Duration) -> crate::Result<()> {
    let md = agent.local_metadata().await?;
    let key = agent.issue_key();
    let mut out = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    out.write_all(format!("READY {} {} {}\n", hex(&md), reg.id().0, hex(&key)).as_bytes())
        .await
        .ok();
    out.flush().await.ok();
    while let Ok(Some(line)) = lines.next_line().await {
        let f: Vec<&str> = line.split_whitespace().collect();
        let reply = match f.as_slice() {
            ["EXIT"] => break,
            ["POISON"] => {
                mem.fill(POISON);
                "POISONED".to_string()
            }
            ["EXPECT", tag, seed, segments, seg_len, stride, check] => {
                let p = |s: &str| s.parse::<u64>().unwrap_or(0);
                let tag = p(tag);
                let layout = Layout {
                    segments: p(segments),
                    seg_len: p(seg_len),
                    dst_stride: p(stride),
                };
                match agent.wait_notification(tag, deadline).await {
                    Err(e) => format!("ERR {tag} {e}"),
                    Ok(()) if *check == "1" => match verify(mem.as_ref(), &layout, p(seed)) {
                        Ok(()) => format!("OK {tag}"),
                        Err(what) => format!("BAD {tag} {what}"),
                    },
                    Ok(()) => format!("OK {tag}"),
                }
            }
            _ => format!("ERR 0 unknown command {line:?}"),
        };
        out.write_all(reply.as_bytes()).await.ok();
        out.write_all(b"\n").await.ok();
        out.flush().await.ok();
    }
    Ok(())
}

/// Registers a poisoned host region of `len` bytes and serves it (the usual target).
pub async fn serve_host_target(agent: &Agent, len: usize, deadline: Duration) -> crate::Result<()> {
    let buf = Arc::new(HostBuffer::new(len));
    buf.fill(POISON);
    let reg = agent.register(Memory::host(buf.clone()))?;
    serve_target(agent, buf, &reg, deadline).await
}

/// The initiator's handle on a target child process.
pub struct TargetProcess {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    pub metadata: Vec<u8>,
    /// The key the target issued for this process's [`Agent::connect`].
    pub key: Vec<u8>,
    pub region: u32,
    deadline: Duration,
}

impl TargetProcess {
    /// Starts `cmd` (which must run [`serve_target`]) and reads its READY line.
    pub async fn spawn(mut cmd: Command, deadline: Duration) -> std::io::Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let bad = |m: String| std::io::Error::other(m);
        // Skip whatever a harness prints first (a test runner's banner).
        let line = tokio::time::timeout(deadline, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find("READY ") {
                    return Ok(line[at..].to_string());
                }
            }
            Err(bad("target exited before READY".into()))
        })
        .await
        .map_err(|_| bad("target did not start in time".into()))??;
        let f: Vec<&str> = line.split_whitespace().collect();
        let (metadata, region, key) = match f.as_slice() {
            ["READY", md, region, key] => (
                unhex(md).ok_or_else(|| bad("bad READY metadata".into()))?,
                region.parse().map_err(|_| bad("bad region".into()))?,
                unhex(key).ok_or_else(|| bad("bad READY key".into()))?,
            ),
            _ => return Err(bad(format!("unexpected target output {line:?}"))),
        };
        Ok(TargetProcess {
            child,
            stdin,
            lines,
            metadata,
            key,
            region,
            deadline,
        })
    }

    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await
    }

    async fn reply(&mut self) -> std::io::Result<String> {
        tokio::time::timeout(self.deadline * 2, self.lines.next_line())
            .await
            .map_err(|_| std::io::Error::other("target did not answer in time"))??
            .ok_or_else(|| std::io::Error::other("target exited"))
    }

    /// Announces a write the target must wait for (send before posting the write).
    pub async fn expect(&mut self, tag: u64, seed: u64, layout: &Layout, verify: bool) -> std::io::Result<()> {
        self.send(&format!(
            "EXPECT {tag} {seed} {} {} {} {}",
            layout.segments, layout.seg_len, layout.dst_stride, verify as u8
        ))
        .await
    }

    /// The target's verdict on the last announced write: `Ok(())` or the reason.
    pub async fn outcome(&mut self) -> std::io::Result<Result<(), String>> {
        let line = self.reply().await?;
        Ok(if line.starts_with("OK ") { Ok(()) } else { Err(line) })
    }

    /// Re-poisons the target region.
    pub async fn poison(&mut self) -> std::io::Result<()> {
        self.send("POISON").await?;
        let line = self.reply().await?;
        if line == "POISONED" {
            Ok(())
        } else {
            Err(std::io::Error::other(line))
        }
    }

    /// Asks the target to exit and returns its exit code.
    pub async fn exit(mut self) -> std::io::Result<Option<i32>> {
        let _ = self.send("EXIT").await;
        let status = tokio::time::timeout(self.deadline, self.child.wait())
            .await
            .map_err(|_| std::io::Error::other("target did not exit"))??;
        Ok(status.code())
    }

    /// The target's process id (to stop and continue it in failure tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the target (failure tests).
    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}
