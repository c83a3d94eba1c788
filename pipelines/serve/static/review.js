// The review page: upload a scan, save review decisions. Plain DOM, no build step.
"use strict";

function authHeaders() {
  const token = document.getElementById("token");
  return token && token.value ? { Authorization: "Bearer " + token.value } : {};
}

function thumb(url, title) {
  const img = document.createElement("img");
  img.src = url; img.width = 64; img.height = 64; img.title = title; img.alt = title;
  return img;
}

function showUpload(box, body) {
  box.textContent = "";
  const head = document.createElement("p");
  head.id = "upload-id";
  head.textContent = (body.new ? "New image " : "Already in the store: ") + body.image_id;
  box.appendChild(head);
  for (const [model, score] of Object.entries(body.scores)) {
    const p = document.createElement("p");
    p.className = "score";
    const probs = Object.entries(score.proba).map(([k, v]) => k + " " + v.toFixed(3));
    p.textContent = model + ": " + score.predicted + " (" + probs.join(", ") + ")";
    box.appendChild(p);
  }
  for (const [table, found] of Object.entries(body.neighbours)) {
    const row = document.createElement("div");
    row.className = "neighbours"; row.dataset.table = table;
    for (const n of found) {
      const img = thumb(n.thumbnail, n.label + " " + n.similarity.toFixed(3));
      img.className = "neighbour"; img.dataset.imageId = n.image_id;
      row.appendChild(img);
    }
    box.appendChild(row);
  }
}

document.getElementById("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const box = document.getElementById("upload-result");
  const form = new FormData();
  form.append("file", document.getElementById("upload-file").files[0]);
  const label = document.getElementById("upload-label").value.trim();
  if (label) form.append("label", label);
  box.textContent = "Uploading...";
  const answer = await fetch("/v1/images", { method: "POST", body: form, headers: authHeaders() });
  const body = await answer.json();
  if (!answer.ok) { box.textContent = "Refused (" + answer.status + "): " + body.detail; return; }
  showUpload(box, body);
});

for (const form of document.querySelectorAll("form.review")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const decisions = [];
    for (const row of form.querySelectorAll("tr.suspect")) {
      const decision = row.querySelector("[name=decision]").value;
      if (!decision) continue;
      decisions.push({ image_id: row.dataset.imageId, decision: decision,
                       new_label: row.querySelector("[name=new_label]").value,
                       reason: row.querySelector("[name=reason]").value });
    }
    const saved = form.querySelector(".saved");
    const answer = await fetch("/v1/reviews", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ table: form.dataset.table, view: form.elements.view.value,
                             who: form.elements.who.value, decisions: decisions }) });
    const body = await answer.json();
    saved.textContent = answer.ok ? "Saved: view " + body.view + " revision " + body.revision
                                  : "Refused (" + answer.status + "): " + body.detail;
    saved.id = answer.ok ? "saved-ok" : "saved-error";
  });
}
