-- Quarto filter (listed under `filters` in nbs/_quarto.yml): show_doc signatures are code blocks, and nbdev turns each
-- `name` in their docments comments into a markdown link [`name`](url), which a code block shows as raw text.
-- This keeps the name only. Pandoc runs the global functions named after element types (here CodeBlock).
function unlink_code_names(text)
  return (text:gsub("%[`([^`%]]+)`%]%([^%)%s]+%)", "%1"))
end

function CodeBlock(el)
  el.text = unlink_code_names(el.text)
  return el
end
