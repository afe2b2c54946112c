// ClawForge fleet dashboard: table sorting and filtering in place, a running rollout's
// progress from server-sent events, and a job page that follows its rollout. No framework.
"use strict";

function cellValue(row, i) {
  const cell = row.cells[i];
  const v = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  const n = Number(v);
  return v !== "" && !Number.isNaN(n) ? n : v.toLowerCase();
}

function makeSortable(table) {
  table.querySelectorAll("thead th").forEach((th, i) => {
    th.addEventListener("click", (ev) => {
      ev.preventDefault();
      const asc = th.dataset.order !== "asc";
      table.querySelectorAll("thead th").forEach((o) => delete o.dataset.order);
      th.dataset.order = asc ? "asc" : "desc";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows).filter((r) => r.cells.length > 1);
      rows.sort((a, b) => {
        const x = cellValue(a, i), y = cellValue(b, i);
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

function makeFilter(input) {
  const table = document.getElementById(input.dataset.filterTable);
  const apply = () => {
    const q = input.value.trim().toLowerCase();
    Array.from(table.tBodies[0].rows).forEach((r) => {
      r.hidden = q !== "" && !r.textContent.toLowerCase().includes(q);
    });
  };
  input.addEventListener("input", apply);
  input.form && input.form.addEventListener("submit", (ev) => { ev.preventDefault(); apply(); });
  apply();
}

const OUTCOME_CLASS = { ok: "good", current: "good", succeeded: "good", rolled_back: "warn",
  halted: "warn", interrupted: "warn", failed: "bad", unreachable: "bad", skipped: "dim",
  running: "live" };

function followRollout(box) {
  const source = new EventSource(box.dataset.events);
  source.onmessage = (ev) => {
    const r = JSON.parse(ev.data);
    const status = document.getElementById("status");
    status.textContent = r.status;
    status.className = OUTCOME_CLASS[r.status] || "";
    box.dataset.status = r.status;
    document.getElementById("progress").textContent = `${r.done} of ${r.total}`;
    document.getElementById("seconds").textContent = r.seconds;
    const bar = document.getElementById("bar");
    bar.max = r.total; bar.value = r.done;
    document.getElementById("rollout-error").textContent = r.error;
    document.getElementById("stopped-at").textContent = r.stopped_at ? `stopped at ${r.stopped_at}` : "";
    for (const d of r.devices) {
      const row = box.querySelector(`tr[data-device="${CSS.escape(d.device)}"]`);
      if (!row) continue;
      row.querySelector(".from").textContent = d.from_image;
      row.querySelector(".to").textContent = d.to_image;
      row.querySelector(".phase").textContent = d.phase;
      const out = row.querySelector(".outcome");
      out.textContent = d.outcome;
      out.className = `outcome ${OUTCOME_CLASS[d.outcome] || ""}`;
      row.querySelector(".secs").textContent = d.seconds === null ? "" : d.seconds;
      row.querySelector(".error").textContent = d.error;
    }
  };
  source.addEventListener("end", () => { source.close(); box.dataset.ended = "1"; });
}

function followJob(box) {
  const poll = async () => {
    const res = await fetch(`/jobs/${box.dataset.id}.json`);
    if (!res.ok) return;
    const job = await res.json();
    document.getElementById("job-output").textContent = job.output;
    document.getElementById("job-state").textContent = job.running ? "running" : `exited ${job.rc}`;
    if (job.rollout_id) { window.location = `/rollouts/${job.rollout_id}`; return; }
    if (job.running) setTimeout(poll, 700);
  };
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach(makeSortable);
  document.querySelectorAll("input[data-filter-table]").forEach(makeFilter);
  const rollout = document.getElementById("rollout");
  if (rollout && rollout.dataset.events) followRollout(rollout);
  const job = document.getElementById("job");
  if (job && job.dataset.running === "1") followJob(job);
});
