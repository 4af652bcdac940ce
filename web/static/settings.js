// The page's own settings: theme, language, the settings popover, the phone drawer, and the slider values,
// all remembered in localStorage.

import { storage } from "./conversations.js";
import { language, setLanguage } from "./i18n.js";

const THEME_KEY = "vlgate.theme";
const SLIDERS_KEY = "vlgate.sliders";

function applyTheme(ui, theme) {
  document.documentElement.dataset.theme = theme;
  ui.darkMode.checked = theme === "dark";
}

/** Wire the theme switch, the language menu (`onLanguage` after a switch) and the popover. */
export function setUpSettings(ui, { onLanguage }) {
  const system = window.matchMedia("(prefers-color-scheme: dark)");
  applyTheme(ui, storage("get", THEME_KEY) || (system.matches ? "dark" : "light"));
  // Until the user picks a theme here, follow the system's.
  system.addEventListener("change", () => {
    if (!storage("get", THEME_KEY)) applyTheme(ui, system.matches ? "dark" : "light");
  });
  ui.darkMode.addEventListener("change", () => {
    const theme = ui.darkMode.checked ? "dark" : "light";
    applyTheme(ui, theme);
    storage("set", THEME_KEY, theme);
  });
  ui.language.value = language();
  ui.language.addEventListener("change", () => {
    setLanguage(ui.language.value);
    onLanguage();
  });
  const toggle = (open) => {
    ui.settingsPanel.hidden = !open;
    ui.settingsButton.setAttribute("aria-expanded", String(open));
  };
  ui.settingsButton.addEventListener("click", () => toggle(ui.settingsPanel.hidden));
  document.addEventListener("click", (e) => {
    if (!ui.settingsPanel.hidden && !e.target.closest(".settings")) toggle(false);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !ui.settingsPanel.hidden) {
      toggle(false);
      ui.settingsButton.focus();
    }
    if (e.key === "Escape" && ui.sidebar.classList.contains("open")) closeDrawer(ui);
  });
  ui.menu.addEventListener("click", () => openDrawer(ui));
  ui.drawerClose.addEventListener("click", () => closeDrawer(ui));
  ui.scrim.addEventListener("click", () => closeDrawer(ui));
}

/** On narrow screens the panel is a drawer over the chat. */
export function openDrawer(ui) {
  ui.sidebar.classList.add("open");
  ui.scrim.hidden = false;
  ui.menu.setAttribute("aria-expanded", "true");
}

export function closeDrawer(ui) {
  ui.sidebar.classList.remove("open");
  ui.scrim.hidden = true;
  ui.menu.setAttribute("aria-expanded", "false");
}

/** The sliders show their values, and keep them across reloads. */
export function setUpSliders(ui, maxTokensLimit) {
  ui.maxTokens.max = String(Math.min(Number(ui.maxTokens.max), maxTokensLimit));
  try {
    const saved = JSON.parse(storage("get", SLIDERS_KEY) || "null");
    if (saved?.temperature != null) ui.temperature.value = saved.temperature;
    if (saved?.maxTokens != null) ui.maxTokens.value = saved.maxTokens;
  } catch {
    /* defaults then */
  }
  const save = () => storage("set", SLIDERS_KEY,
                             JSON.stringify({ temperature: ui.temperature.value, maxTokens: ui.maxTokens.value }));
  const bind = (input, output, format) => {
    const show = () => { output.textContent = format(Number(input.value)); };
    input.addEventListener("input", () => {
      show();
      save();
    });
    show();
  };
  bind(ui.temperature, ui.temperatureValue, (v) => v.toFixed(1));
  bind(ui.maxTokens, ui.maxTokensValue, (v) => String(v));
}
