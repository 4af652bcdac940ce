// Edit and resend a question, or regenerate an answer, on a branch: POST /api/sessions/<id>/fork copies the
// conversation up to that question into a new one, which is opened and asked the question again.

import { readAsDataUrl } from "./attach.js";
import { titleFrom } from "./conversations.js";
import { t } from "./i18n.js";
import { addNote } from "./view.js";

// {state, api, access, serverMessage, conversations, openConversation, submit}: app.js's
let ctx = null;

export function setUpBranches(context) {
  ctx = context;
}

async function imageAsDataUrl(imageId) {
  const response = await ctx.access.fetch(`/api/images/${encodeURIComponent(imageId)}`);
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const blob = await response.blob();
  return { dataUrl: await readAsDataUrl(blob), name: imageId, size: blob.size, note: "" };
}

/**
 * Copy the open conversation up to the question that `root` asks or answers into a new conversation, open it,
 * and ask that question there again (as `text` when edited). The original conversation stays as it was.
 */
export async function branchFrom(root, text = null) {
  if (ctx.state.turn || ctx.state.restoring || !ctx.state.sessionId) return;
  const jobId = root.dataset.jobId;
  const fail = (message) => addNote(root, "error", message);
  const session = await ctx.api(`/api/sessions/${encodeURIComponent(ctx.state.sessionId)}`);
  if (!session.ok) return fail(ctx.serverMessage(session.body, `HTTP ${session.status}`));
  const index = session.body.messages.findIndex((m) => m.role === "user" && m.job_id === jobId);
  if (!jobId || index < 0) return fail("This message is not stored on the server, so it cannot be branched.");
  const question = session.body.messages[index];
  let image = null;
  try {
    if (question.image_ids.length) image = await imageAsDataUrl(question.image_ids[0]);
  } catch (err) {
    return fail(`Could not load the image: ${err.message}`);
  }
  const fork = await ctx.api(`/api/sessions/${encodeURIComponent(ctx.state.sessionId)}/fork`, {
    method: "POST", headers: { Accept: "application/json", "Content-Type": "application/json" },
    body: JSON.stringify({ before: index }),
  });
  if (!fork.ok) return fail(ctx.serverMessage(fork.body, `HTTP ${fork.status}`));
  const title = ctx.conversations.find(ctx.state.sessionId)?.title || titleFrom(question.text);
  ctx.conversations.remember(fork.body.session_id, index ? t("branch", { title }) : (text ?? question.text));
  await ctx.openConversation(fork.body.session_id);
  await ctx.submit(text ?? question.text, image);
}
