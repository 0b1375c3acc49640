-- Quarto filter (listed under `filters` in nbs/_quarto.yml). Pandoc runs the global functions named after element
-- types (CodeBlock, Image).
--
-- 1. show_doc signatures are code blocks, and nbdev turns each `name` in their docments comments into a markdown link
--    [`name`](url), which a code block shows as raw text: keep the name only.
-- 2. Chapters embed committed result figures as ../reproductions/results/...; tools/quarto_copy_figures.py (pre-render) copies
--    them into the project, so the image points one level up less.
function unlink_code_names(text)
  return (text:gsub("%[`([^`%]]+)`%]%([^%)%s]+%)", "%1"))
end

function results_image_path(src)
  return (src:gsub("^%.%./(.-reproductions/results/)", "%1"))
end

function CodeBlock(el)
  el.text = unlink_code_names(el.text)
  return el
end

function Image(el)
  el.src = results_image_path(el.src)
  return el
end
