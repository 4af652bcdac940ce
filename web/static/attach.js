// Attaching an image to the next message: choose, drop or paste; big photos are shrunk here with a canvas
// (the server scales to about 1024² anyway), so only files the browser cannot decode are refused.

import { t } from "./i18n.js";

const MAX_SIDE = 2048; // longer side sent at most; still twice what the model sees
const SHRINK_ABOVE_BYTES = 3 * 1024 * 1024;

export const megabytes = (bytes) => (bytes / (1024 * 1024)).toFixed(1);

export function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** Draw `img` at most `side` px on its longer side and encode it as JPEG (photos) under `limit` bytes. */
async function shrink(img, side, limit) {
  for (let size = side, quality = 0.9; size >= 256; size = Math.round(size * 0.75), quality = 0.85) {
    const scale = Math.min(1, size / Math.max(img.naturalWidth, img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff"; // transparent PNGs become white, not black, as JPEG
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(img, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", quality));
    if (blob && blob.size <= limit) return { blob, width: canvas.width, height: canvas.height };
  }
  return null;
}

/**
 * Turn a File into {dataUrl, name, size, note}: as it is when small, shrunk otherwise. Throws an Error whose
 * message is for the user when the file cannot be used.
 */
export async function prepareImage(file, limitBytes) {
  const name = file.name || "pasted image";
  let dataUrl;
  const probe = new Image();
  try {
    dataUrl = await readAsDataUrl(file);
    probe.src = dataUrl;
    await probe.decode();
  } catch {
    throw new Error(file.type && !file.type.startsWith("image/") ? t("notImage", { name }) : t("unreadable", { name }));
  }
  const big = Math.max(probe.naturalWidth, probe.naturalHeight) > MAX_SIDE;
  if (file.size <= Math.min(SHRINK_ABOVE_BYTES, limitBytes) && !big) return { dataUrl, name, size: file.size, note: "" };
  const small = await shrink(probe, MAX_SIDE, Math.min(limitBytes, SHRINK_ABOVE_BYTES));
  if (!small) throw new Error(t("tooLarge", { size: megabytes(file.size), limit: megabytes(limitBytes) }));
  const from = `${probe.naturalWidth}×${probe.naturalHeight}, ${megabytes(file.size)} MB`;
  const to = `${small.width}×${small.height}, ${megabytes(small.blob.size)} MB`;
  return { dataUrl: await readAsDataUrl(small.blob), name, size: small.blob.size, note: t("resized", { from, to }) };
}

/** The attachment of the next message: the panel's drop zone and preview, the input row's button, paste. */
export class Attachment {
  constructor(ui, limitBytes) {
    this.ui = ui;
    this.limitBytes = limitBytes;
    this.image = null; // {dataUrl, name, size, note}
  }

  showError(message) {
    this.ui.imageError.textContent = message;
    this.ui.imageError.hidden = !message;
  }

  async accept(file) {
    this.showError("");
    if (!file) return;
    try {
      this.set(await prepareImage(file, this.limitBytes));
    } catch (err) {
      this.showError(err.message);
    }
  }

  set(image) {
    const { ui } = this;
    this.image = image;
    ui.previewImage.src = image.dataUrl;
    ui.previewName.textContent = `${image.name} · ${megabytes(image.size)} MB`;
    ui.previewNote.textContent = image.note || "";
    ui.previewNote.hidden = !image.note;
    ui.preview.hidden = false;
    ui.chooseImage.hidden = true;
    ui.attach.classList.add("has-image");
    ui.attach.title = ui.previewName.textContent;
  }

  clear() {
    const { ui } = this;
    this.image = null;
    ui.imageInput.value = ""; // so choosing the same file again still fires "change"
    ui.previewImage.removeAttribute("src");
    ui.preview.hidden = true;
    ui.chooseImage.hidden = false;
    ui.attach.classList.remove("has-image");
  }

  setUp(dropzone) {
    const { ui } = this;
    ui.chooseImage.addEventListener("click", () => ui.imageInput.click());
    ui.attach.addEventListener("click", () => ui.imageInput.click());
    ui.imageInput.addEventListener("change", () => this.accept(ui.imageInput.files[0]));
    ui.removeImage.addEventListener("click", () => {
      this.clear();
      this.showError("");
    });
    for (const target of [ui.sidebar, ui.chat]) {
      const zone = target === ui.sidebar ? dropzone : ui.chat;
      target.addEventListener("dragover", (e) => {
        if (![...e.dataTransfer.types].includes("Files")) return;
        e.preventDefault();
        zone.classList.add("dragging");
      });
      target.addEventListener("dragleave", (e) => {
        if (!target.contains(e.relatedTarget)) zone.classList.remove("dragging");
      });
      target.addEventListener("drop", (e) => {
        e.preventDefault();
        zone.classList.remove("dragging");
        this.accept(e.dataTransfer.files[0]);
      });
    }
    // A file dropped anywhere else must not navigate away from the conversation.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (!item) return; // ordinary text pastes into the input as usual
      e.preventDefault();
      this.accept(item.getAsFile());
    });
  }
}
