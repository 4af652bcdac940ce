// The batch page's files: what a pick or a drop holds, which of them the server would refuse (checked here,
// before any upload, against the limits the server wrote into the page), and thumbnails read from the
// browser's own copy of each file (nothing is fetched back from the server).

export const IMAGE_NAME = /\.(png|jpe?g|bmp|webp|gif)$/i;
const MB = 1024 * 1024;

/** The server's limits, from the page's data attributes (web/batch_page.py). */
export function serverLimits(element) {
  const number = (name, fallback) => Number(element.dataset[name]) || fallback;
  return {
    imageBytes: number("maxImageBytes", 10 * MB),
    items: number("maxItems", 10_000),
    promptChars: number("maxPromptChars", 32_000),
  };
}

const isHidden = (name) => name.split("/").some((part) => part.startsWith("."));

/**
 * Sort found files into those to send and those refused now, each refusal with its reason.
 * Hidden files are left out silently (a folder pick brings .DS_Store and the like); everything else that is
 * not sent is said.
 */
export function checkFiles(found, limits) {
  const accepted = [];
  const refused = [];
  for (const item of found) {
    if (isHidden(item.name)) continue;
    const type = item.file.type;
    if (!IMAGE_NAME.test(item.name) || (type && !type.startsWith("image/"))) {
      refused.push({ ...item, reason: "type" });
    } else if (item.file.size === 0) {
      refused.push({ ...item, reason: "empty" });
    } else if (item.file.size > limits.imageBytes) {
      refused.push({ ...item, reason: "size" });
    } else {
      accepted.push(item);
    }
  }
  return { accepted, refused };
}

/** Say why files were not taken, in one line per reason. */
export function describeRefusals(refused, limits) {
  const labels = {
    type: "不是图片 not an image (png, jpg, jpeg, bmp, webp, gif)",
    empty: "空文件 empty",
    size: `超过 larger than ${formatBytes(limits.imageBytes)}`,
  };
  return Object.entries(labels).flatMap(([reason, label]) => {
    const names = refused.filter((item) => item.reason === reason).map((item) => item.name);
    if (!names.length) return [];
    const sample = names.slice(0, 3).join(", ") + (names.length > 3 ? ` … +${names.length - 3}` : "");
    return [`${names.length} 个文件未加入 not added, ${label}: ${sample}`];
  });
}

/** Sizes in one unit family everywhere on the page (KB, MB, GB of 1024). */
export function formatBytes(bytes) {
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

/** Read every file under dropped entries; folders are walked with the File and Directory Entries API. */
export async function fromDrop(entries, plainFiles) {
  if (!entries.length) return plainFiles.map((file) => ({ name: file.name, file }));
  const found = [];
  const walk = async (entry) => {
    if (entry.name.startsWith(".")) return;
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      found.push({ name: entry.fullPath.replace(/^\/+/, ""), file });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      // readEntries answers in pieces (100 at a time in Chromium) until it answers an empty list.
      for (;;) {
        const children = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!children.length) break;
        for (const child of children) await walk(child);
      }
    }
  };
  for (const entry of entries) await walk(entry);
  return found;
}

/** Thumbnails from the browser's copies of the files; decoded only when scrolled into view. */
export class Thumbnails {
  constructor() {
    this.urls = [];
  }

  /** Return an <img> for a file (or a dash when the page no longer has it, e.g. after a reload). */
  make(file, name) {
    if (!file) {
      const none = document.createElement("span");
      none.className = "thumb-none";
      none.textContent = "—";
      none.title = "重新加载后没有本地文件 No local copy after a reload";
      return none;
    }
    const url = URL.createObjectURL(file);
    this.urls.push(url);
    const img = document.createElement("img");
    img.className = "thumb";
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = name;
    img.src = url;
    return img;
  }

  /** Let the browser free the files' memory. */
  clear() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }
}
