// One language at a time on the chat page: English or Chinese, remembered, first chosen from the browser.
// Static text in index.html carries data-i18n="<key>" (text) or data-i18n-attr="attr:key,attr:key".

const LANG_KEY = "vlgate.lang";

const STRINGS = {
  en: {
    title: "vlgate chat", controls: "Controls", chats: "Chats", newChat: "New chat", noChats: "No chats yet",
    untitled: "Untitled chat", rename: "Rename", delete: "Delete", cancel: "Cancel",
    confirmDelete: "Delete “{title}”? Its messages are deleted on the server and cannot be restored.",
    status: "Status", connecting: "Connecting…", image: "Image", attach: "Attach an image",
    choose: "Click, drop or paste an image — large photos are shrunk in the browser before sending",
    removeImage: "Remove image", params: "Parameters", temperature: "Temperature", maxLength: "Max length",
    appliesNext: "Applies to the next message", batchLink: "Batch: a folder of images →", settings: "Settings",
    darkMode: "Dark mode", language: "Language", conversation: "Conversation", message: "Message",
    empty: "Upload an image and ask about it, or just type a question.",
    placeholder: "Ask… (Enter sends)", enterHint: "Enter sends, Shift+Enter adds a line", send: "Send", stop: "Stop",
    menu: "Menu", dismiss: "Dismiss", closeImage: "Close",
    thinking: "Thinking…", emptyAnswer: "(empty answer)", stopped: "Stopped", yourImage: "Your image",
    defaultPrompt: "Describe this image.", defaultPromptNote: "No question given: asked “{prompt}”",
    resized: "Shrunk in the browser from {from} to {to} before sending",
    notImage: "“{name}” is not an image.", unreadable: "“{name}” is not a readable PNG, JPEG, BMP, WEBP or GIF image.",
    tooLarge: "Image too large: {size} MB; the limit is {limit} MB.",
    ready: "Ready", busy: "Busy", down: "Service down", workerError: "Worker error", loading: "Loading model…",
    noWorker: "No worker running", unreachable: "Server unreachable", notReady: "Model not ready",
    workerLost: "Worker lost", model: "Model", device: "Device", memory: "Memory",
    demo: "Demo model: random weights, answers are random text",
    lostNote: "Worker lost: no worker is running this job (job {status}). It continues when a worker comes back.",
    silentNote: "No reply for {s} s — job {status}.",
    cannotReach: "Cannot reach the server (the WebSocket is not connected); try again shortly.",
    connectionLost: "The connection was lost before the server accepted the message; please send it again.",
    copy: "Copy", copyCode: "Copy the code", edit: "Edit and resend", regenerate: "Regenerate", sendEdit: "Send",
    branch: "{title} (branch)",
  },
  zh: {
    title: "vlgate 对话", controls: "控制面板", chats: "对话", newChat: "新对话", noChats: "还没有对话",
    untitled: "未命名对话", rename: "重命名", delete: "删除", cancel: "取消",
    confirmDelete: "删除“{title}”？服务器上的消息将被删除，无法恢复。",
    status: "模型状态", connecting: "连接中…", image: "图片", attach: "添加图片",
    choose: "点击选择、拖放或粘贴图片——大照片会先在浏览器中缩小再发送",
    removeImage: "移除图片", params: "生成参数", temperature: "温度", maxLength: "最大长度",
    appliesNext: "应用于下一条消息", batchLink: "批量处理：一个文件夹的图片 →", settings: "设置",
    darkMode: "深色模式", language: "语言", conversation: "对话", message: "消息",
    empty: "上传一张图片并提问，或直接输入问题。",
    placeholder: "输入问题（Enter 发送）", enterHint: "Enter 发送，Shift+Enter 换行", send: "发送", stop: "停止",
    menu: "菜单", dismiss: "关闭", closeImage: "关闭",
    thinking: "思考中…", emptyAnswer: "（空回答）", stopped: "已停止", yourImage: "你的图片",
    defaultPrompt: "请描述这张图片。", defaultPromptNote: "没有输入问题：已使用“{prompt}”",
    resized: "已在浏览器中从 {from} 缩小到 {to} 再发送",
    notImage: "“{name}”不是图片。", unreadable: "无法读取“{name}”：不是 PNG、JPEG、BMP、WEBP 或 GIF 图片。",
    tooLarge: "图片太大：{size} MB；上限 {limit} MB。",
    ready: "就绪", busy: "生成中", down: "服务异常", workerError: "Worker 错误", loading: "加载模型中…",
    noWorker: "没有运行中的 worker", unreachable: "服务不可达", notReady: "模型未就绪",
    workerLost: "Worker 失联", model: "模型", device: "设备", memory: "显存",
    demo: "演示模型：随机权重，回答是随机文本",
    lostNote: "Worker 失联：没有 worker 在处理这个任务（任务 {status}）。worker 恢复后会继续。",
    silentNote: "{s} 秒没有回应——任务 {status}。",
    cannotReach: "无法连接服务器（WebSocket 未连接），请稍后再试。",
    connectionLost: "服务器接收消息前连接中断，请重新发送。",
    copy: "复制", copyCode: "复制代码", edit: "编辑并重新发送", regenerate: "重新生成", sendEdit: "发送",
    branch: "{title}（分支）",
  },
};

function initialLanguage() {
  let stored = null;
  try {
    stored = localStorage.getItem(LANG_KEY);
  } catch {
    /* storage disabled */
  }
  if (stored in STRINGS) return stored;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

let current = initialLanguage();

export function language() {
  return current;
}

/** The text for `key` in the current language, with {name} placeholders filled from `vars`. */
export function t(key, vars = {}) {
  const text = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

/** Translate the static page: text of [data-i18n], attributes of [data-i18n-attr], and <html lang>. */
export function translatePage(root = document) {
  document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
  document.title = t("title");
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of root.querySelectorAll("[data-i18n-attr]")) {
    for (const pair of node.dataset.i18nAttr.split(",")) {
      const [attr, key] = pair.split(":");
      node.setAttribute(attr, t(key));
    }
  }
}

/** Switch language, remember it, and retranslate. */
export function setLanguage(lang) {
  if (!(lang in STRINGS)) return;
  current = lang;
  try {
    localStorage.setItem(LANG_KEY, lang);
  } catch {
    /* not remembered then */
  }
  translatePage();
}
