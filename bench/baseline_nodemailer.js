// The nodemailer baseline: its pooled SMTP transport with one connection, sending COUNT
// messages with CONCURRENCY sendMail() calls in flight, to the same sink as postroom.
//
//   NODE_PATH=<dir>/node_modules node bench/baseline_nodemailer.js PORT COUNT CONCURRENCY
//
// bench/bench_pipeline.py installs nodemailer into a temporary folder and runs this file.
// It prints one JSON line: start and end (ms since the epoch), sent, errors, the process's
// CPU time (ms, whole run) and its peak resident set size (KiB).
"use strict";

const nodemailer = require("nodemailer");

const [port, count, concurrency] = process.argv.slice(2).map(Number);
const domain = "nodemailer.localhost";

const transport = nodemailer.createTransport({
  host: "127.0.0.1",
  port,
  secure: false,
  ignoreTLS: true,
  pool: true,
  maxConnections: 1,
  maxMessages: Infinity,
  name: domain, // EHLO name: no host name lookup
});

async function main() {
  let next = 0;
  let sent = 0;
  let errors = 0;
  const start = Date.now();
  async function lane() {
    while (next < count) {
      const n = next++;
      try {
        await transport.sendMail({
          from: `no-reply@${domain}`,
          to: `rcpt-${n}@example.com`,
          subject: `Bench message ${n}`,
          text: `Hello ${n}. This is a benchmark message from the nodemailer baseline.`,
        });
        sent++;
      } catch (err) {
        errors++;
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, lane));
  const end = Date.now();
  transport.close();
  const usage = process.resourceUsage();
  const cpuMs = (usage.userCPUTime + usage.systemCPUTime) / 1000;
  console.log(
    JSON.stringify({ start, end, sent, errors, cpu_ms: cpuMs, peak_rss_kib: usage.maxRSS }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
